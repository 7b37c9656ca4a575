"""The try-it page of ``tlcli serve``: one HTML document with its CSS and script inline, so it
needs nothing from the network. Labels and names reach the page as JSON data and are shown as
text (``textContent``), never as markup."""

from __future__ import annotations

from tlcli import strict_json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tlcli serve</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:2rem auto;max-width:48rem;padding:0 1rem;color:#1d1d1f;
background:#f6f6f7}
h1{font-size:1.4rem;margin:0 0 .2rem}.meta{color:#666;font-size:13px}
#drop{display:block;border:2px dashed #8a8a8e;border-radius:12px;padding:2.2rem 1rem;text-align:center;
cursor:pointer;background:#fff;margin:1rem 0}
#drop.over{border-color:#2a6fdb;background:#eef4ff}
.result{display:flex;gap:1rem;margin:.8rem 0;padding:.8rem;background:#fff;border-radius:10px;
box-shadow:0 1px 3px rgba(0,0,0,.15)}
.result img,.result .missing{width:112px;height:112px;flex:none;object-fit:cover;border-radius:8px;background:#ddd}
.result .missing{display:flex;align-items:center;justify-content:center;text-align:center;color:#666;font-size:12px}
.bars{flex:1;min-width:0}.file{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.row{display:flex;align-items:center;gap:.5rem;margin:.3rem 0}
.label{width:11rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{flex:1;height:14px;background:#e4e4e7;border-radius:7px;overflow:hidden}
.bar span{display:block;height:100%;background:#2a6fdb}
.pct{width:4rem;text-align:right;font-variant-numeric:tabular-nums}
.error{color:#b3261e}
#why{display:block;margin:-.4rem 0 1rem;font-size:14px}#why[hidden]{display:none}
</style></head><body>
<h1 id="title">tlcli</h1>
<div class="meta" id="about"></div>
<label id="drop">Drop images here, or click to choose files
<input id="files" type="file" accept="image/*" multiple hidden></label>
<label id="why" hidden><input id="explain" type="checkbox"> Show what drove each guess
(a saliency map over the photo; slower)</label>
<div id="results"></div>
<script type="application/json" id="config">__CONFIG__</script>
<script>
"use strict";
const cfg = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
$("title").textContent = "tlcli \\u00b7 " + cfg.name;
$("about").textContent = cfg.labels.length + " labels \\u00b7 engine " + cfg.engine +
  " \\u00b7 top " + cfg.top_k + " shown";
$("why").hidden = !cfg.explain;
const drop = $("drop"), input = $("files");
input.addEventListener("change", () => { classifyAll(input.files); input.value = ""; });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); classifyAll(e.dataTransfer.files);
});
async function classifyAll(files) { for (const f of Array.from(files)) await classify(f); }
async function classify(file) {
  const card = el("div", "result"), img = el("img"), bars = el("div", "bars");
  // A file the browser cannot show (not an image, or a format it lacks): a grey box, not a
  // broken-image icon; its name and the server's error are beside it.
  img.addEventListener("error", () => img.replaceWith(el("div", "missing", "no preview")), {once: true});
  img.alt = file.name; img.src = URL.createObjectURL(file);
  bars.append(el("div", "file", file.name));
  card.append(img, bars); $("results").prepend(card);
  const form = new FormData(); form.append("file", file, file.name);
  const t0 = performance.now();
  let ok = false, body = null, server = "";
  try {
    const r = await fetch("predict?top_k=" + cfg.top_k, {method: "POST", body: form});
    ok = r.ok; body = await r.json();
    const m = /dur=([0-9.]+)/.exec(r.headers.get("Server-Timing") || "");
    if (m) server = ", model " + Number(m[1]).toFixed(0) + " ms";
  } catch (err) { body = {error: String(err)}; }
  const ms = performance.now() - t0;
  const res = Array.isArray(body) ? body[0] : ((body && body.results) || [])[0];
  if (!ok || !res || res.error) {
    bars.append(el("div", "error", (res && res.error) || (body && body.error) || "request failed"));
  } else {
    res.predictions.forEach((p, i) => {
      const row = el("div", "row"), bar = el("div", "bar"), fill = el("span");
      fill.style.width = (100 * p.probability).toFixed(1) + "%"; bar.append(fill);
      row.append(el("div", i === 0 ? "label top-label" : "label", p.label), bar,
                 el("div", "pct", (100 * p.probability).toFixed(1) + "%"));
      bars.append(row);
    });
  }
  bars.append(el("div", "meta time", ms.toFixed(0) + " ms" + server));
  if (ok && res && !res.error && cfg.explain && $("explain").checked) await explain(file, card, bars);
}
async function explain(file, card, bars) {
  const form = new FormData(); form.append("file", file, file.name);
  try {
    const r = await fetch("explain", {method: "POST", body: form});
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || "request failed");
    const img = el("img", "overlay");
    img.alt = "what drove the guess: " + file.name;
    img.src = URL.createObjectURL(await r.blob());
    card.insertBefore(img, bars);
  } catch (err) { bars.append(el("div", "error", "saliency: " + err.message)); }
}
</script></body></html>
"""


def page(*, name: str, labels: list[str], engine: str, top_k: int, explain: bool = False) -> str:
    """The page for a model ``name`` with ``labels``, served by ``engine``, showing ``top_k``;
    with ``explain``, a toggle that also shows each image's saliency overlay (``/explain``)."""
    config = strict_json.dumps({"name": name, "labels": labels, "engine": engine, "top_k": top_k,
                                "explain": explain})
    # Inside <script>, "</" could end the element early: write "<" as a JSON escape.
    return _PAGE.replace("__CONFIG__", config.replace("<", "\\u003c"))

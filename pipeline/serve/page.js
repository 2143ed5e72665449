"use strict";
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000"];
let run = null;
const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, kids = []) => { const e = Object.assign(document.createElement(tag), props); kids.forEach(k => e.append(k)); return e; };

const ordinal = (n) => n + (n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd" : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th");
// which atom a code pattern is: a pooled view's atom id, else the patch's n-th nearest (with both signs, its negative's)
const atomOf = (p) => p.pooled ? `atom ${p.sign_rank}${p.negative ? " of its negative" : ""}`
  : p.negative ? `the ${ordinal(p.sign_rank + 1)} nearest atom to its negative` : `its ${ordinal(p.rank + 1)} nearest atom`;

// Strings from the run (class names, file names) always go in as text, never as markup.
const lines = (parts) => parts.flatMap((p, i) => (i ? [el("br"), p] : [p]));

function figure(src, captions, alt) {  // a server picture: click it for the full-size one in a new tab
  const img = el("img", { src, alt });
  return el("figure", {}, [el("a", { href: src, target: "_blank", rel: "noopener" }, [img]), el("figcaption", {}, lines(captions.map(String)))]);
}

const bounded = (id, lo, hi) => Math.min(hi, Math.max(lo, Math.round(Number($(id).value) || lo)));

async function loadInfo() {
  run = await (await fetch("/info")).json();
  const acc = run.val_accuracy == null ? "" : `, held-out accuracy ${(100 * run.val_accuracy).toFixed(1)}%`;
  $("info").textContent = `${run.run}: ${run.classes.length} classes, ${run.image.height}×${run.image.width}×${run.image.channels} images, ${run.patterns.toLocaleString()} patterns${acc}`;
  $("class").replaceChildren(...run.classes.map((c, i) => el("option", { value: i, textContent: c })));
  $("teach-class").replaceChildren(...run.classes.map(c => el("option", { value: c, textContent: c })), el("option", { value: "", textContent: "a new class…" }));
  showClass($("class").value || 0);
}

let current = null;  // the answer shown: {res, file, fig}

async function teach() {  // learn the shown image as the chosen class, then show its new answer
  const label = $("teach-class").value || $("teach-new").value.trim();
  const status = $("teach-status");
  if (!label) { status.textContent = "type the new class's name first"; return; }
  const form = new FormData();
  form.append("image", current.file, current.file.name);
  form.append("label", label);
  status.textContent = "learning…";
  const r = await fetch(`/learn?patches=${bounded("top", 1, 50)}&k=${bounded("k", 1, 32)}`, { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) { status.textContent = body.error || `error ${r.status}`; return; }
  const l = body.learned;
  const fig = current.fig;
  await loadInfo();
  show(body.result, current.file, fig);
  if (fig) fig.answer = body.result;
  if (fig) fig.querySelector("figcaption").replaceChildren(...lines([body.result.image, `${body.result.prediction} ${Math.max(...Object.values(body.result.probabilities)).toFixed(2)}`]));
  $("teach-status").textContent = `learned as ${l.class}${l.new_class ? " (a new class)" : ""}: it said ${l.before.prediction} ${l.before.probability.toFixed(2)}, now ${l.after.prediction} ${l.after.probability.toFixed(2)}; ` +
    `${l.patterns_moved.toLocaleString()} of its patterns moved, nothing else. ${body.lessons} taught, ${body.unsaved} not saved yet (into ${body.into}).`;
}

async function save() {
  const status = $("teach-status");
  status.textContent = "saving…";
  const r = await fetch("/save", { method: "POST" });
  const body = await r.json();
  status.textContent = r.ok ? `saved ${body.lessons} taught image(s) as a new run in ${body.saved}; serve it with pipe serve ${body.saved}` : (body.error || `error ${r.status}`);
}

async function showClass(c) {
  const box = $("class-patterns");
  box.replaceChildren();
  const view = await (await fetch(`/class/${c}?n=24`)).json();
  view.patterns.forEach(p => box.append(figure(`/pattern/${p.pattern_id}.png`, [`${p.view} ${p.h}×${p.w}`, `seen ${p.count.toLocaleString()}`], `pattern ${p.pattern_id}`)));
}

function cropCanvas(img, p, h, w) {
  const c = el("canvas", { width: p.w, height: p.h, className: "crop" });
  const g = c.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(img, p.x * img.naturalWidth / w, p.y * img.naturalHeight / h, p.w * img.naturalWidth / w, p.h * img.naturalHeight / h, 0, 0, p.w, p.h);
  return c;
}

function show(res, file, fig = null) {
  current = { res, file, fig };
  $("teach").classList.toggle("hidden", !run.learning);
  $("teach-status").textContent = "";
  const h = run.image.height, w = run.image.width, scale = Math.max(1, Math.floor(320 / Math.max(h, w)));
  const shown = $("shown");
  shown.width = w * scale; shown.height = h * scale;
  shown.src = URL.createObjectURL(file);
  const stage = $("stage");
  stage.querySelectorAll(".box").forEach(b => b.remove());
  $("prediction").textContent = res.prediction;
  const fam = $("familiarity"), f = res.familiarity;
  const below = run.familiarity ? run.familiarity.unfamiliar_below : 0;
  fam.classList.toggle("odd", f !== null && f < below);
  fam.textContent = f === null ? "familiarity unknown (the run was trained before it was measured)"
    : f < below ? `familiarity ${f.toFixed(3)}: unlike the images this run learned from; treat the answer with care`
    : `familiarity ${f.toFixed(2)}: ${(100 * f).toFixed(0)}% of the images it was checked against look at least as unusual`;
  const bars = $("bars"); bars.replaceChildren();
  Object.entries(res.probabilities).sort((a, b) => b[1] - a[1]).forEach(([c, p]) => bars.append(
    el("div", { className: "bar" }, [el("span", { textContent: c }), el("div", { className: "track" }, [el("div", { className: "fill", style: `width:${(100 * p).toFixed(1)}%` })]), el("span", { className: "num", textContent: p.toFixed(3) })])));
  $("background").classList.toggle("hidden", !res.background_only);
  const n = res.patch_counts;
  $("counts").textContent = `${n.total.toLocaleString()} patches: ${n.seen.toLocaleString()} seen in training, ${n.composed.toLocaleString()} unseen but composed from seen parts, ${n.unmatched.toLocaleString()} unmatched (left out).`;
  const body = $("patches"); body.replaceChildren();
  shown.onload = () => {
    // one table row per place: the patch once, then each decisive pattern found there (a code
    // patch's atoms, other views of the same pixels), numbered in the order of their push
    const places = [];
    res.patches.forEach((p, i) => {
      const key = `${p.y},${p.x},${p.h},${p.w}`;
      const place = places.find(g => g.key === key) || (places.push({ key, p, items: [] }), places[places.length - 1]);
      place.items.push([p, i]);
    });
    places.forEach((place, g) => {
      const color = COLORS[g % COLORS.length], p0 = place.p;
      const inset = 3 * (g % 4);  // overlapping places: nested outlines, none hidden under another
      stage.append(el("div", { className: "box", style: `left:${p0.x * scale + inset}px;top:${p0.y * scale + inset}px;width:${p0.w * scale - 2 * inset}px;height:${p0.h * scale - 2 * inset}px;border-color:${color}` }));
      place.items.forEach(([p, i], j) => {
        const state = p.seen ? "seen" : (p.composed ? "unseen, composed" : "unseen, unmatched");
        const near = el("div", { className: "pics" });
        const look = (q) => q.view === "code" ? `?brightness=${p.brightness}&contrast=${p.contrast}` : "";  // an atom in this patch's brightness and contrast
        p.nearest.forEach(q => near.append(figure(`/pattern/${q.pattern_id}.png${look(q)}`, [`d=${q.distance.toFixed(1)} ${q.view}`, `seen ${q.count.toLocaleString()}`, q.top_class || "–"], `pattern ${q.pattern_id}`)));
        const cells = [el("td", {}, [el("span", { className: "chip", style: `background:${color}`, textContent: i + 1 })])];
        if (j === 0) {
          cells.push(el("td", { rowSpan: place.items.length }, [cropCanvas(shown, p, h, w)]),
            el("td", { rowSpan: place.items.length, className: "where", textContent: `${p.h}×${p.w} at row ${p.y}, col ${p.x}${p.cell >= 0 ? `, cell ${p.cell}` : ""}${p.flat ? " (flat)" : ""}` }));
        }
        cells.push(
          el("td", { className: "pattern" }, [el("b", { textContent: p.view }), el("br"), ...lines([
            ...(p.view === "code" ? [`${atomOf(p)}, weight ${p.weight.toFixed(2)}`] : []),
            `${state}${p.occurrences > 1 ? `, in ${p.occurrences} places` : ""}`])]),
          el("td", { textContent: (p.contribution >= 0 ? "+" : "") + p.contribution.toFixed(3) }),
          el("td", {}, [near]));
        body.append(el("tr", { className: j === 0 ? "patch-row place" : "patch-row" }, cells));
      });
    });
  };
  const nb = $("neighbours"); nb.replaceChildren();
  res.nearest_images.forEach(m => nb.append(figure(`/training-image/${m.row}.png`, [m.label, (m.name || `#${m.image_id}`).split("/").slice(-2).join("/"), `d=${m.distance.toFixed(2)}`], `training image ${m.image_id}`)));
  ["answer", "patches-section", "images-section"].forEach(id => $(id).classList.remove("hidden"));
}

async function query(chosen) {
  const files = [...chosen].slice(0, 64);
  $("error").textContent = "";
  $("notes").replaceChildren();
  const form = new FormData();
  files.forEach(f => form.append("images", f, f.name));
  const k = bounded("k", 1, 32), patches = bounded("top", 1, 50);
  const r = await fetch(`/query?patches=${patches}&k=${k}`, { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) {  // the last answer is not these files': hide it under the error
    ["answer", "patches-section", "images-section", "strip", "download"].forEach(id => $(id).classList.add("hidden"));
    $("error").textContent = body.error || `error ${r.status}`;
    return;
  }
  (body.notes || []).forEach(n => $("notes").append(el("div", { textContent: `note: ${n}` })));
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([JSON.stringify(body, null, 1)], { type: "application/json" }));
  link.classList.remove("hidden");
  const strip = $("strip"); strip.replaceChildren();
  strip.classList.toggle("hidden", files.length < 2);
  body.results.forEach((res, i) => {
    const fig = el("figure", { title: "show this image's answer" }, [
      el("img", { src: URL.createObjectURL(files[i]), alt: res.image }),
      el("figcaption", {}, lines([res.image, `${res.prediction} ${Math.max(...Object.values(res.probabilities)).toFixed(2)}`]))]);
    fig.onclick = () => { strip.querySelectorAll("figure").forEach(f => f.classList.remove("current")); fig.classList.add("current"); show(fig.answer || res, files[i], fig); };
    strip.append(fig);
  });
  strip.firstChild.classList.add("current");
  show(body.results[0], files[0], strip.firstChild);
}

const drop = $("drop");
drop.onclick = () => $("file").click();
$("file").onchange = (e) => e.target.files.length && query(e.target.files);
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) query(e.dataTransfer.files); };
$("class").onchange = (e) => showClass(e.target.value);
$("teach-class").onchange = (e) => $("teach-new").classList.toggle("hidden", e.target.value !== "");
$("teach-go").onclick = teach;
$("save").onclick = save;
loadInfo();

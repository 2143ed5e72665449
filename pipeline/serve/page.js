"use strict";
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000"];
let run = null;
const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, kids = []) => { const e = Object.assign(document.createElement(tag), props); kids.forEach(k => e.append(k)); return e; };

const ordinal = (n) => n + (n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd" : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th");

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
  run.classes.forEach((c, i) => $("class").append(el("option", { value: i, textContent: c })));
  showClass(0);
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

function show(res, file) {
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
  const n = res.patches;
  $("counts").textContent = `${n.total.toLocaleString()} patches: ${n.seen.toLocaleString()} seen in training, ${n.composed.toLocaleString()} unseen but composed from seen parts, ${n.unmatched.toLocaleString()} unmatched (left out).`;
  const body = $("patches"); body.replaceChildren();
  shown.onload = () => {
    res.top_patches.forEach((p, i) => {
      const color = COLORS[i % COLORS.length];
      const inset = 3 * (i % 4);  // patterns at one place: nested outlines, none hidden under another
      stage.append(el("div", { className: "box", style: `left:${p.x * scale + inset}px;top:${p.y * scale + inset}px;width:${p.w * scale - 2 * inset}px;height:${p.h * scale - 2 * inset}px;border-color:${color}` }));
      const state = p.seen ? "seen" : (p.composed ? "unseen, composed" : "unseen, unmatched");
      const near = el("div", { className: "pics" });
      const look = (q) => q.view === "code" ? `?brightness=${p.brightness}&contrast=${p.contrast}` : "";  // an atom in this patch's brightness and contrast
      p.nearest.forEach(q => near.append(figure(`/pattern/${q.pattern_id}.png${look(q)}`, [`d=${q.distance.toFixed(1)} ${q.view}`, `seen ${q.count.toLocaleString()}`, q.top_class || "–"], `pattern ${q.pattern_id}`)));
      body.append(el("tr", { className: "patch-row" }, [
        el("td", {}, [el("span", { className: "chip", style: `background:${color}`, textContent: i + 1 })]),
        el("td", {}, [cropCanvas(shown, p, h, w)]),
        el("td", {}, [el("b", { textContent: p.view }), ...lines([
          ` ${p.h}×${p.w} at row ${p.y}, col ${p.x}${p.cell >= 0 ? `, cell ${p.cell}` : ""}`,
          ...(p.view === "code" ? [`its ${ordinal(p.rank + 1)} nearest atom`] : []),
          `${state}${p.occurrences > 1 ? `, in ${p.occurrences} places` : ""}`])]),
        el("td", { textContent: (p.contribution >= 0 ? "+" : "") + p.contribution.toFixed(3) }),
        el("td", {}, [near]),
      ]));
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
    fig.onclick = () => { strip.querySelectorAll("figure").forEach(f => f.classList.remove("current")); fig.classList.add("current"); show(res, files[i]); };
    strip.append(fig);
  });
  strip.firstChild.classList.add("current");
  show(body.results[0], files[0]);
}

const drop = $("drop");
drop.onclick = () => $("file").click();
$("file").onchange = (e) => e.target.files.length && query(e.target.files);
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) query(e.dataTransfer.files); };
$("class").onchange = (e) => showClass(e.target.value);
loadInfo();

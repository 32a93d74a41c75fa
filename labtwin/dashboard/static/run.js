// The run page: V-t with the twin's prediction and the anomalies, I-t, V-Q by cycle, dQ/dV, capacity and CE,
// impedance, the timeline; live while the run runs, zoom asks the server for the visible span at full detail.
"use strict";
const runId = decodeURIComponent(location.pathname.split("/").pop());
const W = 560;
const state = { series: null, twin: [], anomalies: [], actions: [], zoomed: false, meta: null };
window.__labtwinRun = state;
let vt = null, it = null;

function markersHook(u) {
  const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
  ctx.save(); ctx.lineWidth = 1.5 * devicePixelRatio;
  for (const [list, colour] of [[state.anomalies, "#a3281b"], [state.actions, "#b07800"]]) {
    ctx.setLineDash(colour === "#b07800" ? [4 * devicePixelRatio, 3 * devicePixelRatio] : []);
    ctx.strokeStyle = colour;
    for (const m of list) {
      if (m.time_s === null || m.time_s === undefined) continue;
      const x = u.valToPos(m.time_s, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
    }
  }
  ctx.restore();
}

function vtData() {
  const s = state.series;
  if (!state.twin.length) { const none = s.time_s.map(() => null); return [s.time_s, s.voltage_V, none, none, none]; }
  const band = k => state.twin.map(p => p.sigma_V === null || p.sigma_V === undefined ? null : p.predicted_V + k * 3 * p.sigma_V);
  return uPlot.join([[s.time_s, s.voltage_V], [state.twin.map(p => p.time_s), state.twin.map(p => p.predicted_V), band(-1), band(1)]]);
}

let zoomTimer = null;
function onZoom(u) {
  if (u.status !== 1 || !state.series) return;
  const min = u.scales.x.min, max = u.scales.x.max, t = state.series.time_s;
  state.zoomed = t.length > 0 && (min > t[0] || max < t[t.length - 1]);
  clearTimeout(zoomTimer);
  zoomTimer = setTimeout(() => loadSeries(state.zoomed ? min : null, state.zoomed ? max : null), 250);
}

// The current's unit from the run's own scale: a thin film's microamps read as microamps, not 0.005 mA.
let currentScale = { k: 1e3, unit: "mA" };
function pickCurrentScale(values) {
  const m = Math.max(...values.filter(v => v !== null).map(Math.abs), 0);
  currentScale = m >= 1 ? { k: 1, unit: "A" } : m >= 1e-3 ? { k: 1e3, unit: "mA" } : m >= 1e-6 ? { k: 1e6, unit: "µA" } : { k: 1e9, unit: "nA" };
}
function scaledCurrent(s) { return s.current_A.map(i => i === null ? null : i * currentScale.k); }

function makeTimePlots() {
  pickCurrentScale(state.series.current_A);
  const common = { width: W, height: 280, cursor: { drag: { x: true, y: false } } };
  vt = new uPlot({ ...common,
    scales: { x: { time: false } },
    axes: [{ label: "test time / s" }, { label: "voltage / V", size: 60 }],
    series: [{ label: "t / s" }, { label: "measured V", stroke: "#1f5fa8", width: 1 },
             { label: "twin predicted V", stroke: "#e07b00", paths: () => null, points: { show: true, size: 6 } },
             { label: "−3σ", stroke: "rgba(224,123,0,0.45)", paths: () => null, points: { show: true, size: 3 } },
             { label: "+3σ", stroke: "rgba(224,123,0,0.45)", paths: () => null, points: { show: true, size: 3 } }],
    hooks: { draw: [markersHook], setScale: [(u, key) => key === "x" && onZoom(u)] },
  }, vtData(), document.getElementById("plot-vt"));
  it = new uPlot({ ...common,
    scales: { x: { time: false } },
    axes: [{ label: "test time / s" }, { label: `current / ${currentScale.unit}`, size: 60 }],
    series: [{ label: "t / s" }, { label: `current / ${currentScale.unit}`, stroke: "#2a8a4a", width: 1 }],
    hooks: { draw: [markersHook] },
  }, [state.series.time_s, scaledCurrent(state.series)], document.getElementById("plot-it"));
  for (const u of [vt, it]) u.over.addEventListener("dblclick", () => { state.zoomed = false; loadSeries(null, null); });
}

async function loadSeries(from, to) {
  const q = new URLSearchParams({ points: String(2 * W) });
  if (from !== null && from !== undefined) { q.set("from", from); q.set("to", to); }
  const s = await labtwin.getJSON(`/api/runs/${encodeURIComponent(runId)}/series?${q}`);
  state.series = s;
  document.getElementById("plot-vt").dataset.points = s.time_s.length;
  document.getElementById("plot-vt").dataset.samples = s.n_samples;
  if (!vt) { makeTimePlots(); return; }
  vt.setData(vtData(), from === null); it.setData([s.time_s, scaledCurrent(s)], from === null);
}

function appendLive(p) {
  if (!state.series || state.zoomed) return;
  const s = state.series;
  for (let k = 0; k < p.time_s.length; k++) {
    if (s.time_s.length && p.time_s[k] <= s.time_s[s.time_s.length - 1]) continue;
    s.time_s.push(p.time_s[k]); s.voltage_V.push(p.voltage_V[k]); s.current_A.push(p.current_A[k]);
  }
  document.getElementById("plot-vt").dataset.points = s.time_s.length;
  if (s.time_s.length > 8 * W) { loadSeries(null, null); return; }  // back to a downsampled whole
  vt.setData(vtData()); it.setData([s.time_s, scaledCurrent(s)]);
}

async function loadCycles() {
  const c = await labtwin.getJSON(`/api/runs/${encodeURIComponent(runId)}/cycles`);
  const cycles = c.curves.map(x => x.cycle);
  const lo = Math.min(...cycles, 1), hi = Math.max(...cycles, 1);
  const colour = n => labtwin.viridis(hi > lo ? (n - lo) / (hi - lo) : 0);
  document.getElementById("cb-min").textContent = lo; document.getElementById("cb-max").textContent = hi;
  // The same curves as `analyze cycling --plot` (labtwin.analysis.curves): charge since the cycle began, and
  // dQ/dV signed by direction (charge +, discharge -).
  xyPlot(document.getElementById("plot-vq"), { width: W, xlabel: "charge since cycle start / mAh (+ in)", ylabel: "voltage / V",
    series: c.curves.map(x => ({ x: x.charge_mAh, y: x.voltage_V, color: colour(x.cycle) })) });
  xyPlot(document.getElementById("plot-dqdv"), { width: W, xlabel: "voltage / V", ylabel: "dQ/dV / mAh V⁻¹ (+ charge)",
    series: c.dqdv.map(x => ({ x: x.voltage_V, y: x.dq_dv_mAh_per_V, color: colour(x.cycle) })) });
  const rows = c.cycles;
  const el = document.getElementById("plot-cap");
  el.innerHTML = "";  // drawn again as cycles complete: one chart, not one per refresh
  el.dataset.cycles = rows.length;
  if (rows.length) {
    new uPlot({ width: W, height: 260, scales: { x: { time: false }, ce: { range: [null, null] } },
      axes: [{ label: "cycle" }, { label: "retention / %", size: 60 }, { side: 1, scale: "ce", label: "CE / %", size: 60, grid: { show: false } }],
      series: [{ label: "cycle" }, { label: "capacity retention / %", stroke: "#1f5fa8", points: { show: true } },
               { label: "CE / %", scale: "ce", stroke: "#a3281b", points: { show: true } }],
    }, [rows.map(r => r.cycle), rows.map(r => r.retention === null ? null : r.retention * 100),
        rows.map(r => r.coulombic_efficiency === null ? null : r.coulombic_efficiency * 100)], el);
  } else el.textContent = "no complete cycle yet";
  const t = document.getElementById("cycles");
  t.innerHTML = "<tr><th>cycle</th><th>charge / mAh</th><th>discharge / mAh</th><th>CE / %</th><th>retention / %</th></tr>";
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const v of [r.cycle, r.charge_mAh.toFixed(4), r.discharge_mAh.toFixed(4),
      r.coulombic_efficiency === null ? "–" : (r.coulombic_efficiency * 100).toFixed(2), r.retention === null ? "–" : (r.retention * 100).toFixed(2)]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    }
    t.appendChild(tr);
  }
}

async function loadImpedance() {
  const z = await labtwin.getJSON(`/api/runs/${encodeURIComponent(runId)}/impedance`);
  if (!z.spectra.length) {
    document.getElementById("no-eis").hidden = false;
    for (const id of ["plot-bode", "plot-rtrend"]) document.getElementById(id).textContent = "no impedance spectra in this run";
    return;
  }
  const n = z.spectra.length;
  const colour = k => labtwin.viridis(n > 1 ? k / (n - 1) : 0);
  const series = [];
  z.spectra.forEach((s, k) => {
    series.push({ x: s.z_real_ohm, y: s.z_imag_ohm.map(v => -v), color: colour(k), points: true,
      markers: s.frequency_Hz.map((f, i) => ({ f, i })).filter(m => Math.abs(Math.log10(m.f) % 1) < 0.05)
        .map(m => ({ x: s.z_real_ohm[m.i], y: -s.z_imag_ohm[m.i], text: m.f >= 1 ? m.f.toFixed(0) + " Hz" : m.f.toPrecision(1) + " Hz" })) });
    if (s.fit && s.fit.z_real_ohm) series.push({ x: s.fit.z_real_ohm, y: s.fit.z_imag_ohm.map(v => -v), color: colour(k) });
  });
  // Equal axes over the arcs: a blocking electrode's capacitive line (-Z'' rising to tens of kOhm at 0.1 Hz) or a
  // long diffusion tail would squash the arcs into the corner; where the data run on past three times the arcs'
  // span, the window holds the arcs and the rest runs off the edge (the Bode panels show all of it).
  const re = z.spectra.flatMap(s => s.z_real_ohm.filter(v => v !== null && isFinite(v)));
  const im = z.spectra.flatMap(s => s.z_imag_ohm.filter(v => v !== null && isFinite(v)).map(v => -v));
  const fittedRe = z.spectra.filter(s => s.fit && s.fit.z_real_ohm).flatMap(s => s.fit.z_real_ohm);
  const reSpan = Math.max(...re) - Math.min(...re);
  const arcSpan = fittedRe.length ? Math.max(...fittedRe) - Math.min(...re) : reSpan;
  let xmax, ymax;
  if (Math.max(...im) > 3 * Math.max(reSpan, 1e-12)) ymax = 1.2 * reSpan;
  if (fittedRe.length && reSpan > 3 * arcSpan) { xmax = Math.min(...re) + 1.5 * arcSpan; ymax = 1.5 * arcSpan; }
  xyPlot(document.getElementById("plot-nyquist"), { width: W, equal: true, xmax, ymax, xlabel: "Z' / Ω", ylabel: "−Z'' / Ω", series });
  const bode = [];
  z.spectra.forEach((s, k) => {
    bode.push({ x: s.frequency_Hz, y: s.z_real_ohm.map((r, i) => Math.hypot(r, s.z_imag_ohm[i])), color: colour(k), points: true });
    if (s.fit && s.fit.z_real_ohm) bode.push({ x: s.fit.frequency_Hz, y: s.fit.z_real_ohm.map((r, i) => Math.hypot(r, s.fit.z_imag_ohm[i])), color: colour(k) });
  });
  xyPlot(document.getElementById("plot-bode"), { width: W, height: 220, logx: true, logy: true, xlabel: "frequency / Hz", ylabel: "|Z| / Ω", series: bode });
  // Bode's phase, under its modulus: where each arc's time constant shows as a peak of -phase.
  let phaseEl = document.getElementById("plot-phase");
  if (!phaseEl) { phaseEl = document.createElement("div"); phaseEl.id = "plot-phase"; document.getElementById("plot-bode").after(phaseEl); }
  const phase = [];
  z.spectra.forEach((s, k) => {
    phase.push({ x: s.frequency_Hz, y: s.z_real_ohm.map((r, i) => -Math.atan2(s.z_imag_ohm[i], r) * 180 / Math.PI), color: colour(k), points: true });
    if (s.fit && s.fit.z_real_ohm) phase.push({ x: s.fit.frequency_Hz, y: s.fit.z_real_ohm.map((r, i) => -Math.atan2(s.fit.z_imag_ohm[i], r) * 180 / Math.PI), color: colour(k) });
  });
  xyPlot(phaseEl, { width: W, height: 200, logx: true, xlabel: "frequency / Hz", ylabel: "−phase / °", series: phase });
  // Resistances of every fit against the cycle of its spectrum: the trend the twin's impedance-growth check watches.
  const fits = z.spectra.filter(s => s.fit && s.fit.parameters);
  const names = fits.length ? Object.keys(fits[0].fit.parameters).filter(p => /^R\d+$/.test(p)) : [];
  xyPlot(document.getElementById("plot-rtrend"), { width: W, xlabel: "cycle", ylabel: "resistance / Ω",
    series: names.map((p, j) => ({ x: fits.map(s => s.cycle), y: fits.map(s => s.fit.parameters[p].value),
      color: labtwin.viridis(names.length > 1 ? j / (names.length - 1) : 0), points: true,
      markers: fits.length ? [{ x: fits[fits.length - 1].cycle, y: fits[fits.length - 1].fit.parameters[p].value, text: p }] : [] })) });
  const last = z.spectra[z.spectra.length - 1];
  const box = document.getElementById("eis-fit");
  if (last.fit && last.fit.parameters) {
    const parts = Object.entries(last.fit.parameters).map(([p, v]) =>
      `${p} = ${v.value.toPrecision(4)} ${v.unit}` + (v.standard_error === null ? " (± ?)" : ` ± ${v.standard_error.toPrecision(2)}`) + (v.uncertain ? " ⚠ not determined by the data" : ""));
    box.textContent = `last spectrum (cycle ${last.cycle}): ${last.fit.circuit}, relative RMS ${(last.fit.relative_rms * 100).toFixed(2)} %` +
      (last.fit.success ? "" : " (fit did not converge)") + ": " + parts.join("; ");
    box.dataset.uncertain = Object.values(last.fit.parameters).filter(v => v.uncertain).length;
  } else if (last.fit) box.textContent = "fit failed: " + last.fit.error;
}

async function loadTimeline() {
  const tl = await labtwin.getJSON(`/api/runs/${encodeURIComponent(runId)}/timeline`);
  state.twin = tl.twin; state.anomalies = tl.anomalies; state.actions = tl.actions;
  const items = [
    ...tl.steps.map(s => ({ t: s.time_s, cls: "step", text: `step ${s.step_index} ${s.label} ended (cycle ${s.cycle}) ${s.reason}` })),
    ...tl.anomalies.map(a => ({ t: a.time_s, cls: "anomaly", text: `ANOMALY ${a.kind} (cycle ${a.cycle}): ${a.message}` })),
    ...tl.outages.map(o => ({ t: o.from_s, cls: "outage", text: `outage ${o.cause}: ${o.from_s.toFixed(0)} to ${o.to_s === null ? "?" : o.to_s.toFixed(0)} s` })),
    ...tl.actions.map(a => ({ t: a.time_s, cls: "action", text: `${a.action} by ${a.user_name} (${a.role}) at ${a.wall_time}: ${a.outcome} ${a.detail}` })),
  ].sort((a, b) => (a.t ?? 1e300) - (b.t ?? 1e300));
  const ul = document.getElementById("timeline"); ul.innerHTML = "";
  for (const i of items) { const li = document.createElement("li"); li.className = i.cls;
    li.textContent = (i.t === null || i.t === undefined ? "" : labtwin.duration(i.t) + ": ") + i.text; ul.appendChild(li); }
  if (vt) vt.setData(vtData(), false);
}

async function main() {
  // Every read at once: the server answers them in parallel (the run's columns are read once for all).
  const id = encodeURIComponent(runId);
  const [, meta] = await Promise.all([labtwin.whoami(), labtwin.getJSON(`/api/runs/${id}`)]);
  state.meta = meta;
  document.getElementById("title").textContent = `${meta.cell_id || "?"}: ${meta.protocol || "?"} (run ${meta.run_id})`;
  const m = document.getElementById("meta");
  for (const [k, v] of [["lab", meta.lab], ["channel", meta.channel], ["started", meta.started], ["status", meta.exit_status || "running"], ["reason", meta.reason]])
    if (v) { const s = document.createElement("span"); s.textContent = `${k}: ${v}`; m.appendChild(s); }
  const ex = document.getElementById("exports");
  for (const f of ["csv", "parquet", "bdf"]) { const a = document.createElement("a"); a.href = `/api/runs/${encodeURIComponent(meta.run_id)}/export.${f}`;
    a.textContent = `export ${f.toUpperCase()}`; a.style.marginRight = "1em"; ex.appendChild(a); }
  if (!meta.exit_status && meta.lab && meta.channel) document.getElementById("run-actions").appendChild(labtwin.actionButtons(meta.lab, meta.channel));
  await Promise.all([loadTimeline(), loadSeries(null, null), loadCycles(), loadImpedance()]);
  document.body.dataset.ready = "1";
  const src = new EventSource(`/api/events?run=${encodeURIComponent(meta.run_id)}&lab=${encodeURIComponent(meta.lab || "")}`);
  let refresh = null;
  src.addEventListener("snapshot", ev => { const s = JSON.parse(ev.data); labtwin.busState(s.broker.state, s.broker.detail); });
  src.addEventListener("update", ev => {
    const u = JSON.parse(ev.data);
    if (u.points) appendLive(u.points);
    for (const x of u.updates) {
      if (x.kind === "broker") labtwin.busState(x.state, x.detail);
      else if (x.kind === "twin" && x.run_id === meta.run_id) state.twin.push(x);
      else if (x.kind === "event" && x.event.run_id === meta.run_id) {
        clearTimeout(refresh); refresh = setTimeout(() => { loadTimeline(); loadCycles(); }, 500);
      }
    }
  });
}
main().catch(e => { if (e.message !== "login") { document.getElementById("title").textContent = "cannot show run " + runId + ": " + e.message; document.getElementById("title").className = "error"; } });

// A small canvas plot for curves that are not functions of time (V-Q, dQ/dV, Nyquist, Bode): each series has
// its own x. uPlot draws the long time series; these have hundreds of points per curve.
"use strict";
function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}
function xyPlot(el, opts) {
  const W = opts.width || 560, H = opts.height || 300, L = 70, R = 12, T = 10, B = 42;
  const cv = document.createElement("canvas");
  const dpr = window.devicePixelRatio || 1;
  cv.width = W * dpr; cv.height = H * dpr; cv.style.width = W + "px"; cv.style.height = H + "px";
  el.innerHTML = ""; el.appendChild(cv);
  const g = cv.getContext("2d"); g.scale(dpr, dpr);
  const tx = opts.logx ? v => Math.log10(v) : v => v;
  const ty = opts.logy ? v => Math.log10(v) : v => v;
  const bad = (x, y) => x === null || y === null || !isFinite(x) || !isFinite(y) || (opts.logx && x <= 0) || (opts.logy && y <= 0);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, n = 0;
  for (const s of opts.series) for (let i = 0; i < s.x.length; i++) {
    const x = s.x[i], y = s.y[i];
    if (bad(x, y)) continue;
    const X = tx(x), Y = ty(y); x0 = Math.min(x0, X); x1 = Math.max(x1, X); y0 = Math.min(y0, Y); y1 = Math.max(y1, Y); n++;
  }
  el.dataset.points = n;
  g.font = "12px system-ui"; g.fillStyle = "#1d232b"; g.strokeStyle = "#d9dee4";
  if (!n) { g.fillText("no data", W / 2 - 20, H / 2); return; }
  // A window the caller asks for (the Nyquist plot's arcs, when a long low-frequency tail would squash them):
  // what lies beyond it is clipped, not rescaled into it.
  if (opts.xmax !== undefined && opts.xmax < x1) x1 = opts.xmax;
  if (opts.ymax !== undefined && opts.ymax < y1) y1 = opts.ymax;
  if (opts.equal) { const span = Math.max(x1 - x0, y1 - y0); x1 = x0 + span; y1 = y0 + span; }
  const padY = (y1 - y0) * 0.05 || 1; y0 -= padY; y1 += padY;
  const px = X => L + (X - x0) / (x1 - x0 || 1) * (W - L - R), py = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  g.lineWidth = 1;
  for (const t of niceTicks(x0, x1, 6)) { g.beginPath(); g.moveTo(px(t), T); g.lineTo(px(t), H - B); g.stroke();
    g.fillText(opts.logx ? "1e" + t : String(t), px(t) - 10, H - B + 14); }
  g.textAlign = "right";
  for (const t of niceTicks(y0, y1, 5)) { g.beginPath(); g.moveTo(L, py(t)); g.lineTo(W - R, py(t)); g.stroke();
    g.fillText(opts.logy ? "1e" + t : String(t), L - 6, py(t) + 4); }
  g.textAlign = "left";
  g.textAlign = "center"; g.fillText(opts.xlabel, L + (W - L - R) / 2, H - 8); g.textAlign = "left";
  g.save(); g.translate(12, T + (H - T - B) / 2); g.rotate(-Math.PI / 2); g.textAlign = "center"; g.fillText(opts.ylabel, 0, 0); g.restore();
  g.save(); g.beginPath(); g.rect(L, T, W - L - R, H - T - B); g.clip();
  for (const s of opts.series) {
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = 1.5; g.beginPath(); let pen = false;
    for (let i = 0; i < s.x.length; i++) {
      const x = s.x[i], y = s.y[i];
      if (bad(x, y)) { pen = false; continue; }
      const X = px(tx(x)), Y = py(ty(y));
      if (s.points) g.fillRect(X - 1.5, Y - 1.5, 3, 3);
      if (pen) g.lineTo(X, Y); else g.moveTo(X, Y);
      pen = true;
    }
    if (!s.points) g.stroke();
    // Marker labels only where they do not overprint the last one drawn (decades bunch up at an arc's foot).
    let lastX = -1e9, lastY = -1e9;
    for (const m of s.markers || []) {
      const X = px(tx(m.x)) + 4, Y = py(ty(m.y)) - 4;
      if (Math.hypot(X - lastX, Y - lastY) < 40) continue;
      g.fillText(m.text, X, Y); lastX = X; lastY = Y;
    }
  }
  g.restore();
}

// The Lab page: one tile per channel, moved by the server-sent stream of the bus.
"use strict";
const tiles = new Map();
const latency = (window.__labtwinLatency = []);  // ms from the sample's arrival at the server to its tile drawn
const params = new URLSearchParams(location.search);
const labFilter = params.get("lab") || "";

function field(dl, name, key) {
  const dt = document.createElement("dt"); dt.textContent = name;
  const dd = document.createElement("dd"); dd.className = "tile-" + key;
  dl.append(dt, dd);
  return dd;
}

function tileFor(t) {
  const key = t.lab + "/" + t.channel;
  let el = tiles.get(key);
  if (el) return el;
  el = document.createElement("div");
  el.className = "tile"; el.dataset.lab = t.lab; el.dataset.channel = t.channel;
  const h = document.createElement("h3");
  const name = document.createElement("span"); name.textContent = t.channel;
  const lab = document.createElement("span"); lab.className = "muted"; lab.textContent = t.lab;
  h.append(name, lab);
  const dl = document.createElement("dl");
  el.f = {};
  for (const [n, k] of [["state", "state"], ["cell", "cell"], ["protocol", "protocol"], ["step", "step"], ["cycle", "cycle"],
    ["voltage", "voltage"], ["current", "current"], ["temperature", "temperature"], ["twin SOC", "soc"],
    ["step ends in", "eta"], ["anomaly", "anomaly"], ["run", "run"]]) el.f[k] = field(dl, n, k);
  el.append(h, dl, labtwin.actionButtons(t.lab, t.channel));
  tiles.set(key, el);
  const box = document.getElementById("tiles");
  const after = [...box.children].find(c => (c.dataset.lab + "/" + c.dataset.channel) > key);
  box.insertBefore(el, after || null);
  return el;
}

function drawTile(t) {
  const el = tileFor(t), f = el.f;
  el.className = "tile " + t.state;
  const msg = (t.message || "").startsWith(t.state) ? t.message.slice(t.state.length).replace(/^[:\s]+/, "") : t.message;
  f.state.textContent = t.state + (msg ? ": " + msg : "");
  f.cell.textContent = t.cell_id || "–";
  f.protocol.textContent = t.protocol || "–";
  f.step.textContent = t.step_index === null ? "–" : t.step_index + (t.label ? " " + t.label : "");
  f.cycle.textContent = t.cycle === null ? "–" : t.cycle;
  f.voltage.textContent = labtwin.fmt(t.voltage_V, 4, "V");
  const a = t.current_A === null ? null : Math.abs(t.current_A);
  f.current.textContent = t.current_A === null ? "–" : a >= 1 || a === 0 ? t.current_A.toFixed(4) + " A" :
    a >= 1e-3 ? (t.current_A * 1e3).toFixed(4) + " mA" : (t.current_A * 1e6).toFixed(3) + " µA";
  f.temperature.textContent = labtwin.fmt(t.temperature_C, 1, "°C");
  f.soc.textContent = t.soc === null ? "–" : (t.soc * 100).toFixed(1) + " %";
  f.eta.textContent = labtwin.duration(t.time_to_step_end_s);
  f.anomaly.textContent = t.last_anomaly || "none"; f.anomaly.className = "tile-anomaly" + (t.last_anomaly ? " anomaly" : "");
  f.run.textContent = "";
  const run = t.run_id || t.last_run_id;
  if (run) { const a = document.createElement("a"); a.href = "/run/" + encodeURIComponent(run); a.textContent = run + (t.run_id ? "" : " (ended)"); f.run.appendChild(a); }
  // Nothing to pause or stop on a channel without a run (the agent would answer so): buttons off.
  for (const b of el.querySelectorAll("button[data-action]")) b.disabled = !(labtwin.me && labtwin.me.actions_allowed) || !t.run_id;
  if (t.sample_received_ms) latency.push(Date.now() - t.sample_received_ms);
  if (window.__onTile) window.__onTile(t);  // a bench or test watching tiles drawn
  if (latency.length > 100000) latency.splice(0, 50000);
}

function addEvent(e) {
  const ul = document.getElementById("events");
  const li = document.createElement("li"); li.className = e.kind;
  li.textContent = `${new Date(e.wall_ms).toLocaleTimeString()} [${e.lab}] ${e.text}`;
  ul.prepend(li);
  while (ul.children.length > 60) ul.lastChild.remove();
}

function labs(list) {
  const sel = document.getElementById("lab-filter");
  for (const l of list) if (![...sel.options].some(o => o.value === l)) sel.add(new Option(l, l));
  sel.value = labFilter;
}

function connect() {
  const src = new EventSource("/api/events" + (labFilter ? "?lab=" + encodeURIComponent(labFilter) : ""));
  src.addEventListener("snapshot", ev => {
    const s = JSON.parse(ev.data);
    labtwin.busState(s.broker.state, s.broker.detail); labs(s.labs);
    s.tiles.forEach(drawTile); document.getElementById("events").innerHTML = ""; s.events.forEach(addEvent);
  });
  src.addEventListener("update", ev => {
    const u = JSON.parse(ev.data);
    u.tiles.forEach(drawTile);
    for (const x of u.updates) {
      if (x.kind === "event") addEvent(x.event);
      else if (x.kind === "broker") labtwin.busState(x.state, x.detail);
      else if (x.kind === "resync") { src.close(); connect(); return; }
    }
  });
  src.onerror = () => labtwin.busState("unreachable", "the dashboard server is not answering; retrying");
}

document.getElementById("lab-filter").onchange = e => { location.search = e.target.value ? "?lab=" + encodeURIComponent(e.target.value) : ""; };
labtwin.whoami().then(connect);

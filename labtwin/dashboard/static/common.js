// Shared by every page: who is logged in, JSON fetches, operator actions, the bus banner.
"use strict";
const labtwin = {
  me: null,
  async getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin" });
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); throw new Error("login"); }
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  async whoami() {
    labtwin.me = await labtwin.getJSON("/api/whoami");
    const who = document.getElementById("who");
    if (who) {
      who.textContent = labtwin.me.user + " (" + labtwin.me.role + ")";
      if (labtwin.me.logins_required) {
        const a = document.createElement("a"); a.href = "/logout"; a.textContent = " log out"; who.appendChild(a);
      }
    }
    return labtwin.me;
  },
  async act(lab, channel, action) {
    const r = await fetch(`/api/channels/${encodeURIComponent(lab)}/${encodeURIComponent(channel)}/${action}`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": (labtwin.me && labtwin.me.csrf) || "" },
      body: JSON.stringify({}),
    });
    const body = await r.json();
    if (!r.ok) alert(`${action} ${channel}: ${body.error || body.detail || r.statusText}`);
    return { status: r.status, body };
  },
  actionButtons(lab, channel) {
    const box = document.createElement("span");
    box.className = "actions";
    for (const action of ["pause", "resume", "stop"]) {
      const b = document.createElement("button");
      b.textContent = action; b.dataset.action = action;
      b.disabled = !(labtwin.me && labtwin.me.actions_allowed);
      b.title = b.disabled ? "operator login needed" : `${action} the run on ${channel}`;
      b.onclick = () => { if (action !== "stop" || confirm(`stop the run on ${channel}?`)) labtwin.act(lab, channel, action); };
      box.appendChild(b);
    }
    return box;
  },
  busState(state, detail) {
    const el = document.getElementById("bus-state");
    if (!el) return;
    el.className = state; el.textContent = "bus " + state; el.title = detail || "";
  },
  fmt(v, digits, unit) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits) + (unit ? " " + unit : ""); },
  duration(s) {
    if (s === null || s === undefined) return "–";
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    return h ? `${h} h ${m} min` : m ? `${m} min ${sec} s` : `${sec} s`;
  },
  // viridis, sampled: one colour per cycle, low cycles dark, high cycles yellow (colour-blind safe)
  viridis(f) {
    const stops = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
    const x = Math.min(Math.max(f, 0), 1) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), t = x - i;
    const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * t));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  },
};

// The status page's live part: every two seconds, fetch status.json and redraw the summary,
// the replica table and the ring. No framework, no build step.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";
  const R = 100;  // ring radius in SVG units (viewBox is -120..120)
  const url = document.body.dataset.statusUrl;

  // A stable colour per server id: golden-angle hues are far apart for neighbouring ids.
  function colour(serverId) {
    return `hsl(${(serverId * 137.508) % 360}, 62%, 48%)`;
  }

  function el(name, attrs, text) {
    const node = name.startsWith("svg:")
      ? document.createElementNS(SVG, name.slice(4)) : document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fixed(x, digits) {
    return x === null || x === undefined ? "–" : x.toFixed(digits);
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    return seconds < 90 ? `${seconds.toFixed(1)}s ago` : `${Math.round(seconds / 60)}min ago`;
  }

  function setText(id, value) {
    document.getElementById(id).textContent = value;
  }

  function drawSummary(s) {
    setText("n", s.replicas_desired);
    setText("ready", s.replicas_by_state.ready);
    setText("down", s.replicas_by_state.down);
    setText("starting", s.replicas_by_state.starting);
    setText("requests", s.totals.requests);
    setText("errors", s.totals.errors);
    const g = s.registry;
    setText("registry", `${g.store} · revision ${g.revision}` +
                        (g.store === "etcd" ? ` · leader ${g.leader || "none"}` : "") +
                        (g.change_age === null ? "" : ` · changed ${g.change_age.toFixed(1)}s ago`));
    const h = s.hash_map;
    // Formulas written out when there are any: "seed: H(i) = ..." or just "H(i) = ...".
    const name = h.formulas ? (h.preset.includes("=") ? "" : `${h.preset}: `) : h.preset;
    const formulas = h.formulas ? `H(i) = ${h.formulas.H}, Phi(i, j) = ${h.formulas.Phi}` : "";
    setText("hashmap", `${name}${formulas}, M=${h.slots}, K=${h.virtual}, ${h.probing}, ` +
                       `${h.strategy}`);
  }

  function drawTable(s) {
    const body = document.querySelector("#replicas tbody");
    const rows = s.replicas.map((r) => {
      const tr = el("tr", {"data-hostname": r.hostname, "data-state": r.state});
      const name = el("td", {class: "name", title: r.address || "no address yet"}, r.hostname);
      if (r.domain) {  // the failure domain (a Swarm node): retries go to another one first
        name.append(" ", el("span", {class: "domain muted small",
                                     title: "failure domain: retries go to another one first"},
                            `on ${r.domain}`));
      }
      name.style.setProperty("--swatch", colour(r.server_id));
      const state = el("td");
      state.appendChild(el("span", {class: `state ${r.state}`}, r.state));
      if (r.ejected_until !== null && r.ejected_until !== undefined) {
        const left = Math.max(0, r.ejected_until - s.generated_at).toFixed(0);
        state.appendChild(el("span", {
          class: "state ejected",
          title: `this balancer worker routes around it for ${left}s more (failures in a ` +
                 `row); ejected ${r.ejections} times in all`,
        }, "ejected"));
      }
      tr.append(
        name, el("td", {}, r.server_id), state, drawWeight(r), el("td", {}, r.slots_owned),
        drawShare(r),
        el("td", {}, fixed(r.request_rate, 1)), el("td", {}, fixed(r.error_rate, 2)),
        el("td", {}, r.requests), el("td", {}, r.errors),
        el("td", {}, age(r.heartbeat_age)), el("td", {}, r.failures),
      );
      return tr;
    });
    body.replaceChildren(...rows);
  }

  // The weight, with a badge while the replica is drained (0) or ramps up (slow start).
  function drawWeight(r) {
    const td = el("td", {class: "weight"}, String(r.weight));
    if (r.weight === 0) {
      td.append(" ", el("span", {class: "state drained",
                                 title: "drained: routed nothing new, answers what it has"},
                        "drained"));
    }
    if (r.ramp !== null && r.ramp !== undefined) {
      const pct = (r.ramp * 100).toFixed(0);
      td.append(" ", el("span", {class: "state ramp",
                                 title: `slow start: it takes its keys gradually, ${pct}% of ` +
                                        "them so far"}, `ramp ${pct}%`));
    }
    return td;
  }

  // The share the router gives it now; its share at full weight in the title while a ramp
  // makes them differ.
  function drawShare(r) {
    const td = el("td", {}, `${(r.share * 100).toFixed(1)}%`);
    if (Math.abs(r.share - r.expected_share) > 0.0005) {
      td.title = `${(r.expected_share * 100).toFixed(1)}% once slow start's ramps end`;
    }
    return td;
  }

  function point(slot, slots, radius) {
    const a = (slot / slots) * 2 * Math.PI - Math.PI / 2;  // slot 0 at the top, clockwise
    return [radius * Math.cos(a), radius * Math.sin(a)];
  }

  function drawRing(s) {
    const svg = document.getElementById("ring");
    const slots = s.ring.slots;
    const names = {};
    for (const r of s.replicas) names[r.server_id] = r.hostname;
    const parts = [el("svg:circle", {r: R, class: "track"})];
    for (const [first, last, sid] of s.ring.arcs) {
      const span = last + 1 - first;
      const title = el("svg:title", {}, `${names[sid] || "?"} (server id ${sid}): slots ${first}–${last}`);
      let shape;
      if (span >= slots) {
        shape = el("svg:circle", {r: R, class: "arc", stroke: colour(sid)});
      } else {
        const [x0, y0] = point(first, slots, R);
        const [x1, y1] = point(last + 1, slots, R);
        const large = span > slots / 2 ? 1 : 0;
        shape = el("svg:path", {class: "arc", stroke: colour(sid),
                                d: `M ${x0} ${y0} A ${R} ${R} 0 ${large} 1 ${x1} ${y1}`});
      }
      shape.setAttribute("data-server-id", sid);
      shape.appendChild(title);
      parts.push(shape);
    }
    for (const [slot, sid] of s.ring.virtual_servers) {
      const [x0, y0] = point(slot + 0.5, slots, R - 12);
      const [x1, y1] = point(slot + 0.5, slots, R - 20);
      const tick = el("svg:line", {class: "tick", x1: x0, y1: y0, x2: x1, y2: y1,
                                   stroke: colour(sid)});
      tick.appendChild(el("svg:title", {}, `virtual server of ${names[sid] || sid} at slot ${slot}`));
      parts.push(tick);
    }
    if (s.ring.layout === "table") {
      parts.push(el("svg:text", {x: 0, y: -20}, "table: no arcs"));
    }
    parts.push(el("svg:text", {x: 0, y: -6}, `M = ${slots}`));
    parts.push(el("svg:text", {x: 0, y: 8}, `${s.replicas_by_state.ready} ready`));
    svg.replaceChildren(...parts);
  }

  async function refresh() {
    const updated = document.getElementById("updated");
    try {
      const reply = await fetch(url, {cache: "no-store"});
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      const s = (await reply.json()).message;
      drawSummary(s);
      drawTable(s);
      drawRing(s);
      updated.textContent = `live · updated ${new Date().toLocaleTimeString()} · registry v${s.registry_version}`;
      updated.classList.remove("stale");
      document.body.dataset.version = s.registry_version;
    } catch (err) {
      updated.textContent = `cannot refresh (${err.message}); retrying`;
      updated.classList.add("stale");
    }
  }

  refresh();
  setInterval(refresh, REFRESH_MS);
})();

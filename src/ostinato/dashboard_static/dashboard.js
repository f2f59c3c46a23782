// The ostinato dashboard: polls api/loops and redraws the table and charts in place.
// No framework and no build step; every value from the server is set as text, never as HTML.
"use strict";

(() => {
  const POLL_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "ostinato-dashboard-token";
  const NONE = "\u2014"; // an em dash: nothing to show, or not known yet
  const $ = (selector) => document.querySelector(selector);
  const rows = new Map();
  // Loops made of partitions or keys whose members are listed (the server sends them only then).
  const expanded = new Set();
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let control = false;
  let timer = null;

  function fmtDuration(s) {
    if (s === null || s === undefined) return NONE;
    if (s < 0.001) return `${(s * 1e6).toPrecision(3)}µs`;
    if (s < 1) return `${(s * 1e3).toPrecision(3)}ms`;
    if (s < 60) return `${s.toPrecision(3)}s`;
    if (s < 3600) return `${(s / 60).toFixed(1)}m`;
    return `${(s / 3600).toFixed(1)}h`;
  }

  function fmtAgo(wall, now) {
    return wall === null || wall === undefined ? "" : `${fmtDuration(Math.max(0, now - wall))} ago`;
  }

  function fmtRate(perMinute) {
    if (perMinute === null || perMinute === undefined) return NONE;
    return perMinute >= 100 ? Math.round(perMinute).toString() : perMinute.toPrecision(3);
  }

  function fmtPercent(fraction) {
    return fraction === null || fraction === undefined ? NONE : `${(fraction * 100).toFixed(1)}%`;
  }

  function banner(text) {
    const el = $("#banner");
    el.textContent = text || "";
    el.hidden = !text;
  }

  // A state as a CSS class name; a state with no rule in the stylesheet is drawn plainly.
  function stateClass(state) {
    return `state-${String(state).toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  }

  // A sparkline of `field` in an SVG of its own. Its time axis spans the samples there are
  // (at least a minute), up to `history` seconds, so a fresh dashboard's charts are not a dot.
  // The label beside it is the latest point, or a dash while that point is not known.
  function drawChart(svg, label, series, field, history, format) {
    const width = 120, height = 28, pad = 3;
    const points = series.filter((p) => p[field] !== null && p.ago <= history);
    const max = Math.max(...points.map((p) => p[field]), 0);
    const span = Math.min(history, Math.max(60, ...points.map((p) => p.ago)));
    svg.replaceChildren();
    svg.dataset.points = String(points.length);
    const title = document.createElementNS(SVG, "title");
    title.textContent = points.length
      ? `max ${format(max)} over the last ${fmtDuration(span)}` : "no data yet";
    svg.appendChild(title);
    const xy = points.map((p) => {
      const x = width * (1 - p.ago / span);
      const y = max > 0 ? height - pad - (p[field] / max) * (height - 2 * pad) : height - pad;
      return [x.toFixed(1), y.toFixed(1)];
    });
    if (xy.length === 1) {
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", xy[0][0]);
      dot.setAttribute("cy", xy[0][1]);
      dot.setAttribute("r", "2");
      svg.appendChild(dot);
    }
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", xy.map((p) => p.join(",")).join(" "));
    svg.appendChild(line);
    const latest = series.reduce((a, p) => (a === null || p.ago < a.ago ? p : a), null);
    label.textContent = latest && latest[field] !== null ? format(latest[field]) : NONE;
  }

  function chartCell(kind) {
    const td = document.createElement("td");
    const box = document.createElement("div");
    box.className = "chart-box";
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", `chart chart-${kind}`);
    svg.setAttribute("viewBox", "0 0 120 28");
    svg.setAttribute("preserveAspectRatio", "none");
    const label = document.createElement("span");
    label.className = "chart-label";
    box.append(svg, label);
    td.appendChild(box);
    return { td, svg, label };
  }

  function button(action, key) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.action = action;
    b.textContent = action;
    b.addEventListener("click", () => act(b.dataset.action, key));
    return b;
  }

  function makeRow(key) {
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    const cells = {};
    const numbers = ["fence", "passes", "per_minute", "error_rate", "latency"];
    for (const name of ["loop", "state", "holder", "fence", "passes", "per_minute", "rate",
                        "error_rate", "error", "latency", "duration"]) {
      if (name === "rate" || name === "duration") {
        cells[name] = chartCell(name);
        tr.appendChild(cells[name].td);
        continue;
      }
      const td = document.createElement("td");
      td.className = name;
      if (numbers.includes(name)) td.classList.add("num");
      cells[name] = td;
      tr.appendChild(td);
    }
    // p50 over p99, in one cell: two numbers, one column's width.
    for (const name of ["p50", "p99"]) {
      const line = document.createElement("span");
      line.className = name;
      cells[name] = line;
      cells.latency.appendChild(line);
    }
    const actions = document.createElement("td");
    actions.className = "actions";
    cells.toggle = button("pause", key);
    actions.append(cells.toggle, button("wake", key), button("release", key));
    tr.appendChild(actions);
    cells.actions = actions;
    return { tr, cells };
  }

  function renderRow(loop, data) {
    let row = rows.get(loop.key);
    if (!row) {
      row = makeRow(loop.key);
      rows.set(loop.key, row);
    }
    const c = row.cells;
    const state = loop.state;
    c.loop.replaceChildren();
    c.loop.classList.toggle("member", Boolean(loop.parent));
    c.loop.classList.toggle("group", Boolean(loop.group));
    if (loop.group) {
      // One row for the loop: its members counted by state; the arrow lists them.
      const open = document.createElement("button");
      open.className = "expand";
      open.textContent = loop.expanded ? "\u25be" : "\u25b8";
      open.title = loop.expanded ? "hide the members" : `list the ${loop.group.kind}`;
      open.addEventListener("click", () => {
        if (expanded.has(loop.key)) expanded.delete(loop.key);
        else expanded.add(loop.key);
        refresh();
      });
      const more = loop.expanded && loop.group.shown < loop.group.count
        ? `, first ${loop.group.shown} shown` : "";
      c.loop.append(open, `${loop.key} (${loop.group.count} ${loop.group.kind}${more})`);
      c.loop.title = `${loop.key}: ${loop.group.count} ${loop.group.kind}`;
    } else {
      c.loop.textContent = loop.parent ? loop.member : loop.key;
      c.loop.title = loop.key;
    }
    c.state.textContent = loop.group ? loop.summary : state;
    c.state.className = `state ${stateClass(state)}`;
    // The next planned start, in the schedule's own zone (the ISO time carries its offset).
    const showNext = loop.next_start_iso && loop.next_start > data.now + 1
      && state !== "paused" && state !== "no runner";
    c.state.title = showNext ? `next start ${loop.next_start_iso}${loop.zone ? ` (${loop.zone})` : ""}` : "";
    if (showNext) {
      const next = document.createElement("small");
      next.className = "next";
      next.textContent = `next ${loop.next_start_iso.slice(11, 19)}`;
      c.state.append(document.createElement("br"), next);
    }
    row.tr.dataset.state = state;
    c.holder.textContent = loop.holder || NONE;
    c.holder.title = loop.holder || "";
    c.fence.textContent = loop.fence === null ? NONE : String(loop.fence);
    c.passes.textContent = String(loop.passes);
    c.per_minute.textContent = fmtRate(loop.per_minute);
    c.error_rate.textContent = fmtPercent(loop.error_rate);
    c.error.replaceChildren();
    if (loop.last_error) {
      const text = document.createElement("span");
      text.className = "message";
      text.textContent = loop.last_error.split("\n")[0];
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = fmtAgo(loop.last_error_at, data.now);
      c.error.append(text, when);
      c.error.title = loop.last_error;
    } else {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = NONE;
      c.error.append(none);
      c.error.removeAttribute("title");
    }
    c.p50.textContent = fmtDuration(loop.p50);
    c.p99.textContent = fmtDuration(loop.p99);
    c.latency.title = `p50 ${c.p50.textContent}, p99 ${c.p99.textContent} `
      + "(of the pass durations the holder last reported)";
    drawChart(c.duration.svg, c.duration.label, loop.series, "duration", data.history, fmtDuration);
    drawChart(c.rate.svg, c.rate.label, loop.series, "per_minute", data.history, fmtRate);
    c.toggle.dataset.action = c.toggle.textContent = state === "paused" ? "resume" : "pause";
    c.actions.hidden = !control;
    for (const b of c.actions.querySelectorAll("button")) {
      b.disabled = !token;
      b.title = token ? "" : "enter the dashboard's token first";
    }
    return row.tr;
  }

  // How the rates are measured, in the page's help and the rate columns' tooltips.
  function rateHelp(data) {
    const span = `${data.rate_window} seconds`;
    const text = `Passes per minute are the passes counted over the last ${span} the dashboard `
      + `watched, divided by the time actually watched; the error rate is the share of those `
      + `passes that failed. Until the dashboard has watched a full `
      + `${span}, a rate is shown only once ${data.min_passes} passes were counted, and ${NONE} `
      + `before: one pass of a once-a-minute loop seen in the first seconds says nothing of its rate.`;
    $("#rate-help").textContent = text;
    for (const th of document.querySelectorAll("th.rate-help")) th.title = text;
  }

  function render(data) {
    control = data.control;
    rateHelp(data);
    $("#coordinator").textContent = data.coordinator;
    $("#updated").textContent = data.sampled_at
      ? `sampled ${fmtAgo(data.sampled_at, data.now)}, every ${fmtDuration(data.every)}` : "";
    $("#auth").hidden = !control;
    $("#mode").textContent = !control
      ? "read-only (start with --token to allow pause, resume, wake and release)"
      : token ? "controls on" : "controls need the token";
    document.querySelector("th.actions").hidden = !control;
    banner(data.error);
    const tbody = $("#loops tbody");
    const seen = new Set();
    data.loops.forEach((loop, index) => {
      const tr = renderRow(loop, data);
      seen.add(loop.key);
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
    });
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.tr.remove();
        rows.delete(key);
      }
    }
    $("#empty").hidden = data.loops.length > 0;
    document.body.dataset.ready = "true";
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const query = new URLSearchParams([...expanded].map((key) => ["expand", key]));
      const url = expanded.size ? `api/loops?${query}` : "api/loops";
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (err) {
      banner(`the dashboard server does not answer: ${err.message}`);
    } finally {
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  async function act(action, key) {
    try {
      const response = await fetch(`api/loops/${encodeURIComponent(key)}/${action}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}` },
      });
      const answer = await response.json();
      if (response.status === 401) {
        token = "";
        sessionStorage.removeItem(TOKEN_KEY);
      }
      banner(response.ok ? "" : `${action} ${key}: ${answer.error}`);
    } catch (err) {
      banner(`${action} ${key} failed: ${err.message}`);
    }
    refresh();
  }

  $("#auth").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("#token").value.trim();
    $("#token").value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  });

  refresh();
})();

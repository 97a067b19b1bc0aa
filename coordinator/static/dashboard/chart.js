// fedge dashboard charts: line charts of accuracy and loss over model versions and bars of
// update bytes per round, drawn as SVG from the page's JSON data block (#chart-data).
// Written for this dashboard; no dependencies. Every label is set with textContent.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 420, H = 200, PAD = { left: 56, right: 12, top: 12, bottom: 28 };

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, value, anchor) {
    const t = el("text", { x: x, y: y, "text-anchor": anchor || "middle" }, parent);
    t.textContent = value;
    return t;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a === 0 || a >= 1) return String(Math.round(v * 100) / 100);
    return v.toPrecision(2);
  }

  function frame(svg, xmin, xmax, ymin, ymax) {
    const sx = (x) => PAD.left + (xmax === xmin ? 0.5 : (x - xmin) / (xmax - xmin)) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - (ymax === ymin ? 0.5 : (y - ymin) / (ymax - ymin)) * (H - PAD.top - PAD.bottom);
    el("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }, svg);
    el("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }, svg);
    text(svg, PAD.left - 6, sy(ymax) + 4, fmt(ymax), "end");
    text(svg, PAD.left - 6, sy(ymin) + 4, fmt(ymin), "end");
    text(svg, sx(xmin), H - 8, fmt(xmin));
    text(svg, sx(xmax), H - 8, fmt(xmax));
    return { sx, sy };
  }

  function empty(figure, message) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = message;
    figure.appendChild(p);
  }

  function lines(figure, series) {
    const names = Object.keys(series);
    const points = names.flatMap((n) => series[n]);
    if (!points.length) return empty(figure, "no metrics reported yet");
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    const { sx, sy } = frame(svg, Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys));
    const legend = document.createElement("ul");
    legend.className = "legend";
    names.forEach((name, i) => {
      const pts = series[name];
      const line = el("polyline", {
        points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
        class: `series s${i % 4}`,
        "data-series": name,
        "data-points": pts.length,
      }, svg);
      el("title", {}, line).textContent = name;
      for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `s${i % 4}` }, svg);
      const item = document.createElement("li");
      item.className = `s${i % 4}`;
      item.textContent = name;
      legend.appendChild(item);
    });
    figure.appendChild(svg);
    figure.appendChild(legend);
  }

  function bars(figure, rows) {
    if (!rows.length) return empty(figure, "no rounds yet");
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    const ymax = Math.max(1, ...rows.map((r) => r[1]));
    const { sy } = frame(svg, 0, 1, 0, ymax);
    for (const node of svg.querySelectorAll("text")) {
      if (node.getAttribute("text-anchor") === "middle") node.remove();  // x labels: rounds
    }
    const band = (W - PAD.left - PAD.right) / rows.length;
    rows.forEach(([round, bytes], i) => {
      const x = PAD.left + i * band + band * 0.15;
      const bar = el("rect", {
        x: x, y: sy(bytes), width: band * 0.7, height: sy(0) - sy(bytes),
        class: "bar", "data-round": round, "data-bytes": bytes,
      }, svg);
      el("title", {}, bar).textContent = `round ${round}: ${bytes} bytes`;
      if (i === 0 || i === rows.length - 1 || rows.length <= 12) {
        text(svg, x + band * 0.35, H - 8, String(round));
      }
    });
    figure.appendChild(svg);
  }

  function draw() {
    const block = document.getElementById("chart-data");
    if (!block) return;
    const data = JSON.parse(block.textContent);
    const tasks = new Map(data.tasks.map((t) => [String(t.id), t]));
    for (const figure of document.querySelectorAll("figure.chart")) {
      const task = tasks.get(figure.dataset.task);
      if (!task) continue;
      const kind = figure.dataset.kind;
      if (kind === "bytes") {
        bars(figure, task.bytes);
      } else {
        const chosen = {};
        for (const [name, pts] of Object.entries(task.series)) {
          if (name.endsWith(kind)) chosen[name] = pts;
        }
        lines(figure, chosen);
      }
      figure.dataset.drawn = "true";
    }
    document.body.dataset.chartsDrawn = "true";
  }

  document.addEventListener("DOMContentLoaded", draw);
})();

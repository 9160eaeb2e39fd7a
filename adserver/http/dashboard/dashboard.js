// The dashboard: polls the server's own read endpoints and draws them. Read-only, no build step.
// Every URL is relative to the page (it works below a proxy's path prefix); nothing else is
// fetched (the server's Content-Security-Policy refuses any other origin).
"use strict";

(() => {
  const RANGES = { "1h": [3600, 60], "24h": [86400, 3600], "7d": [604800, 3600] };
  const STEPS = [60, 3600, 86400]; // a custom range takes the finest that fits
  const MAX_STEPS = 1440;
  const MAX_MATRIX_CLASSES = 60; // 3,600 cells: a model of 1,000 classes would make a million
  const DASH = "\u2014";
  const $ = (id) => document.getElementById(id);
  const query = new URLSearchParams(location.search);
  const interval = Math.max(1, Number(query.get("interval")) || 5) * 1000;

  let timer = null;
  let running = false;
  let charts = [];
  let drawn = ""; // the range document last drawn: redraw only what changed

  // ---- formatting ----------------------------------------------------------------------------
  const fixed = (value) => (typeof value === "number" && isFinite(value) ? value.toFixed(4) : DASH);
  const whole = (value) => (typeof value === "number" ? String(Math.round(value)) : DASH);
  const isoTime = (seconds) => new Date(seconds * 1000).toISOString().replace(".000Z", "Z");
  const seconds = (value) => {
    if (value === null || !isFinite(value)) return DASH;
    if (value < 120) return `${value.toFixed(1)} s`;
    if (value < 7200) return `${(value / 60).toFixed(1)} min`;
    if (value < 172800) return `${(value / 3600).toFixed(1)} h`;
    return `${(value / 86400).toFixed(1)} d`;
  };

  function cell(tag, text, attributes = {}) {
    const element = document.createElement(tag);
    element.textContent = text;
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
    return element;
  }

  function row(cells, attributes = {}) {
    const tr = cell("tr", "", attributes);
    tr.append(...cells);
    return tr;
  }

  // ---- the Prometheus text format: only the families the page shows --------------------------
  const WANTED = ["feedback_events_", "feedback_label_delay_seconds", "feedback_reply_"];
  const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  function parsePrometheus(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!WANTED.some((prefix) => line.startsWith(prefix))) continue;
      const match = SAMPLE.exec(line);
      if (!match) continue;
      const labels = {};
      for (const [, name, value] of (match[2] || "").matchAll(LABEL)) {
        labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: match[1], labels, value: Number(match[3]) });
    }
    return samples;
  }

  // A sample counts for the model it names (a server of one model may name none).
  const ofModel = (samples, model) =>
    samples.filter((s) => s.labels.model === undefined || s.labels.model === model);
  const total = (samples, name) =>
    samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);

  // histogram_quantile's estimate: linear within the bucket the rank falls in.
  function quantile(q, buckets) {
    const count = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!count) return null;
    const rank = q * count;
    let [lower, below] = [0, 0];
    for (const [upper, cumulative] of buckets) {
      if (cumulative >= rank) {
        if (!isFinite(upper)) return lower; // in the +Inf bucket: the highest finite bound
        return lower + ((upper - lower) * (rank - below)) / Math.max(cumulative - below, 1e-12);
      }
      [lower, below] = [upper, cumulative];
    }
    return lower;
  }

  // ---- what the page asks for ----------------------------------------------------------------
  function localInput(secondsValue) {
    const moment = new Date(secondsValue * 1000);
    return new Date(moment.getTime() - moment.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  }

  function span() {
    const now = Date.now() / 1000;
    const choice = $("range").value;
    if (choice !== "custom") {
      const [length, step] = RANGES[choice];
      const to = Math.ceil(now / step) * step;
      return { from: to - length, to, step };
    }
    const start = Date.parse($("from").value) / 1000;
    const end = Date.parse($("to").value) / 1000;
    if (!(start < end)) throw new Error("custom range: From must be before To");
    const step = STEPS.find((s) => (end - start) / s <= MAX_STEPS) || STEPS[STEPS.length - 1];
    return { from: Math.floor(start / step) * step, to: Math.ceil(end / step) * step, step };
  }

  async function get(url, kind) {
    const answer = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!answer.ok) {
      let detail = answer.statusText;
      try {
        detail = (await answer.json()).error || detail;
      } catch (_) {
        // not JSON: keep the status text
      }
      throw new Error(`${url.split("?")[0]}: ${answer.status} ${detail}`);
    }
    return kind === "json" ? answer.json() : answer.text();
  }

  // ---- drawing -------------------------------------------------------------------------------
  function fillSelect(select, values, labels = {}) {
    const keep = select.value;
    const have = [...select.options].map((o) => o.value);
    if (have.join("\n") !== values.join("\n")) {
      select.replaceChildren(...values.map((v) => cell("option", labels[v] || v, { value: v })));
    }
    select.value = values.includes(keep) ? keep : values[0] ?? "";
  }

  // A model's sections (regression, scores): the rows the page shows of each, if it has it.
  const SECTION_ROWS = {
    regression: [
      ["MAE", (s) => s.mae],
      ["RMSE", (s) => s.rmse],
      ["R2", (s) => s.r2],
      ["MAPE", (s) => s.mape],
      ["mean error", (s) => s.mean_error],
    ],
    scores: [
      ["log loss", (s) => s.log_loss],
      ["Brier score", (s) => s.brier_score],
      ["ROC AUC (macro)", (s) => s.roc_auc.macro.auc],
      ["ROC AUC error bound", (s) => s.roc_auc.macro.error_bound],
      ["expected calibration error", (s) => (s.calibration ? s.calibration.ece : null)],
    ],
  };

  function drawSections(summary) {
    const rows = [];
    for (const [name, metrics] of Object.entries(SECTION_ROWS)) {
      if (!summary[name]) continue;
      for (const [label, value] of metrics) {
        rows.push(
          row([cell("th", label, { scope: "row" }), cell("td", fixed(value(summary[name])))], {
            "data-metric": `${name} ${label}`,
          }),
        );
      }
    }
    $("sections-section").hidden = !rows.length;
    $("sections").tBodies[0].replaceChildren(...rows);
  }

  function drawSummary(summary, samples) {
    drawSections(summary);
    $("accuracy").textContent = summary.rows ? fixed(summary.accuracy) : DASH;
    $("rows").textContent = whole(summary.rows);
    $("events-accepted").textContent = whole(total(samples, "feedback_events_accepted_total"));
    $("events-duplicate").textContent = whole(total(samples, "feedback_events_duplicate_total"));

    const labels = summary.classes || []; // a regressor has none
    $("per-class").tBodies[0].replaceChildren(
      ...labels.map((label) => {
        const stats = summary.per_class[String(label)] || {};
        return row(
          [
            cell("th", String(label), { scope: "row" }),
            cell("td", fixed(stats.precision), { class: "precision" }),
            cell("td", fixed(stats.recall), { class: "recall" }),
            cell("td", fixed(stats.f1), { class: "f1" }),
            cell("td", whole(stats.support), { class: "support" }),
          ],
          { "data-class": String(label) },
        );
      }),
    );

    const classes = labels.map(String);
    const matrix = summary.confusion_matrix || [];
    if (!summary.classes || classes.length > MAX_MATRIX_CLASSES) {
      // a million cells would stall the tab: the counts stay in the JSON API
      const note = summary.classes
        ? `${classes.length} classes: more than ${MAX_MATRIX_CLASSES} are not drawn here; ` +
          "the matrix is in v1/models/<name>/metrics"
        : "No classes: the model is a regressor (see Regression and scores).";
      $("confusion").tHead.replaceChildren();
      $("confusion").tBodies[0].replaceChildren(row([cell("td", note)]));
      return;
    }
    const most = matrix.reduce((m, r) => r.reduce((n, v) => Math.max(n, v), m), 1);
    const head = row([cell("th", "truth \\ prediction", { scope: "col" })]);
    head.append(...classes.map((c) => cell("th", c, { scope: "col" })));
    $("confusion").tHead.replaceChildren(head);
    $("confusion").tBodies[0].replaceChildren(
      ...classes.map((truth, i) => {
        const tr = row([cell("th", truth, { scope: "row" })]);
        tr.append(
          ...classes.map((prediction, j) => {
            const count = matrix[i][j];
            const share = count / most;
            const td = cell("td", String(count), {
              "data-truth": truth,
              "data-prediction": prediction,
              title: `truth ${truth}, predicted ${prediction}: ${count}`,
            });
            td.style.backgroundColor = `hsl(212 80% ${Math.round(97 - share * 62)}%)`;
            if (share > 0.55) td.classList.add("dark");
            if (i === j) td.classList.add("correct");
            return td;
          }),
        );
        return tr;
      }),
    );
  }

  function drawEvents(samples) {
    const reasons = new Map();
    for (const s of samples) {
      if (s.name !== "feedback_events_rejected_total" || s.labels.reason === undefined) continue;
      reasons.set(s.labels.reason, (reasons.get(s.labels.reason) || 0) + s.value);
    }
    const rejected = [...reasons].sort(([a], [b]) => a.localeCompare(b));
    $("rejected").tBodies[0].replaceChildren(
      ...(rejected.length
        ? rejected.map(([reason, count]) =>
            row([cell("td", reason), cell("td", whole(count))], { "data-reason": reason }),
          )
        : [row([cell("td", "none"), cell("td", "0")])]),
    );

    const buckets = samples
      .filter((s) => s.name === "feedback_label_delay_seconds_bucket")
      .map((s) => [s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value])
      .sort((a, b) => a[0] - b[0]);
    const count = total(samples, "feedback_label_delay_seconds_count");
    const delay = cell("table", "");
    delay.append(
      row([cell("th", "labels joined", { scope: "row" }), cell("td", whole(count))]),
      row([cell("th", "median", { scope: "row" }), cell("td", seconds(quantile(0.5, buckets)))]),
      row([cell("th", "90th percentile", { scope: "row" }), cell("td", seconds(quantile(0.9, buckets)))]),
    );
    $("label-delay").replaceChildren(delay);

    const replies = samples.filter((s) => s.name.startsWith("feedback_reply_"));
    if (!replies.length) {
      $("reply-health").replaceChildren(cell("p", "Replies are off (no --reply_url)."));
      return;
    }
    const health = cell("table", "");
    health.append(
      ...replies.map((s) =>
        row([
          cell("th", s.name.replace(/^feedback_reply_/, "").replace(/_total$/, ""), { scope: "row" }),
          cell("td", whole(s.value)),
        ]),
      ),
    );
    $("reply-health").replaceChildren(health);
  }

  function drawRange(document_) {
    const text = JSON.stringify(document_);
    if (text === drawn) return;
    drawn = text;
    const steps = document_.steps;
    const times = steps.map((s) => s.from);
    const accuracy = steps.map((s) => (s.rows ? (s.accuracy ?? null) : null)); // none: a regressor
    const coverage = steps.map((s) => s.label_coverage);

    $("accuracy-table").tBodies[0].replaceChildren(
      ...steps.map((s) =>
        row([
          cell("td", isoTime(s.from)),
          cell("td", s.rows ? fixed(s.accuracy) : DASH),
          cell("td", fixed(s.label_coverage)),
          cell("td", whole(s.rows)),
        ]),
      ),
    );

    const chart = $("accuracy-chart");
    chart.setAttribute("data-points", String(steps.length));
    charts.forEach((c) => c.destroy());
    charts = [];
    chart.replaceChildren();
    if (typeof uPlot === "undefined") {
      chart.append(cell("p", "The chart library did not load; the table has the numbers.", { class: "empty" }));
      return;
    }
    const width = Math.max(280, chart.clientWidth);
    const sync = uPlot.sync("accuracy");
    const plot = (label, values, height, dash) =>
      new uPlot(
        {
          title: label,
          width,
          height,
          cursor: { sync: { key: sync.key } },
          scales: { x: { time: true }, y: { range: [0, 1] } },
          series: [{}, { label, stroke: "#0969da", width: 2, dash, spanGaps: false, value: (_, v) => fixed(v) }],
          axes: [{}, { values: (_, ticks) => ticks.map((t) => t.toFixed(1)) }],
        },
        [times, values],
        chart,
      );
    charts = [
      plot("accuracy", accuracy, 220, undefined),
      plot("label_coverage", coverage, 140, [6, 4]),
    ];
  }

  // ---- the loop ------------------------------------------------------------------------------
  function status(state, text) {
    const element = $("status");
    element.setAttribute("data-state", state);
    element.textContent = text;
  }

  async function refresh() {
    if (running) return;
    running = true;
    try {
      const [document_, text] = await Promise.all([
        get("v1/metrics?format=json", "json"),
        get("v1/metrics", "text"),
      ]);
      const models = Object.keys(document_.models);
      fillSelect($("model"), models);
      const model = $("model").value;
      const summary = document_.models[model];
      if (!summary) throw new Error("the server has no model yet");
      const segments = Object.keys(summary.segments || {}).sort();
      fillSelect($("segment"), ["", ...segments], { "": "All (totals)" });
      const segment = $("segment").value;
      const { from, to, step } = span();
      const range = new URLSearchParams({ from, to, step });
      if (segment) range.set("segment", segment);
      const ranged = await get(`v1/models/${encodeURIComponent(model)}/metrics?${range}`, "json");
      const samples = ofModel(parsePrometheus(text), model);
      drawSummary(segment ? summary.segments[segment] : summary, samples);
      drawEvents(samples);
      drawRange(ranged);
      const now = Date.now();
      $("status").setAttribute("data-updated", String(now));
      status("live", `Live: updated ${new Date(now).toLocaleTimeString()}, every ${interval / 1000} s`);
    } catch (error) {
      status("error", `Error: ${error.message} (retrying every ${interval / 1000} s)`);
    } finally {
      running = false;
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (document.hidden) {
      status("paused", "Paused while the tab is hidden");
      return;
    }
    refresh().finally(() => {
      if (!document.hidden) timer = setTimeout(schedule, interval);
    });
  }

  function remember() {
    const state = new URLSearchParams(location.search);
    for (const id of ["model", "segment", "range"]) {
      if ($(id).value) state.set(id, $(id).value);
      else state.delete(id);
    }
    history.replaceState(null, "", `?${state}`);
  }

  function changed() {
    $("custom-range").hidden = $("range").value !== "custom";
    drawn = "";
    remember();
    schedule();
  }

  // Start where the address says (?model=&segment=&range=&interval=): links can be shared.
  for (const id of ["model", "segment"]) {
    if (query.get(id)) $(id).replaceChildren(cell("option", query.get(id), { value: query.get(id) }));
  }
  if (RANGES[query.get("range")] || query.get("range") === "custom") $("range").value = query.get("range");
  const now = Date.now() / 1000;
  $("from").value = localInput(now - 3600);
  $("to").value = localInput(now + 60); // the input drops seconds: keep this minute in range
  $("custom-range").hidden = $("range").value !== "custom";
  for (const id of ["model", "segment", "range", "from", "to"]) $(id).addEventListener("change", changed);
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  document.addEventListener("visibilitychange", schedule);
  window.addEventListener("resize", () => {
    drawn = "";
  });
  schedule();
})();

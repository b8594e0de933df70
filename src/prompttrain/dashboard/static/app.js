/* Agent Prompt Train dashboard: local times, charts (uPlot), the raw JSON viewer, and live updates over /sse.
 *
 * Rule: data is only ever put into the page with textContent / createElement (never innerHTML); HTML fragments
 * come from the server (Jinja2 templates, autoescaped) and are swapped in by htmx.
 */
(function () {
  "use strict";

  // -- local times and countdowns ----------------------------------------------------------------------------
  var timeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (element) {
      var moment = new Date(element.getAttribute("datetime"));
      if (!isNaN(moment.getTime())) {
        element.title = element.textContent;
        element.textContent = timeFormat.format(moment);
      }
    });
    root.querySelectorAll("[data-countdown]").forEach(function (element) {
      var moment = new Date(element.getAttribute("data-countdown"));
      var seconds = Math.round((moment.getTime() - Date.now()) / 1000);
      if (isNaN(seconds)) return;
      if (seconds <= 0) { element.textContent = "(passed)"; return; }
      var days = Math.floor(seconds / 86400), hours = Math.floor((seconds % 86400) / 3600);
      var minutes = Math.floor((seconds % 3600) / 60);
      element.textContent = "(in " + (days ? days + "d " : "") + (days || hours ? hours + "h " : "") + minutes + "m)";
    });
  }

  // -- charts --------------------------------------------------------------------------------------------------
  var palette = ["#2f6fcf", "#d0731d", "#2a9d8f", "#8a56c2", "#b3261e", "#6b7075", "#c9a227", "#3b9c4a"];

  function readJson(id) {
    var source = document.getElementById(id);
    if (!source) return null;
    try { return JSON.parse(source.textContent); } catch (error) { return null; }
  }

  function charts(root) {
    if (typeof uPlot === "undefined") return;
    var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
    var axisColor = dark ? "#99a0a8" : "#6b7075";
    var gridColor = dark ? "rgba(255,255,255,0.08)" : "rgba(0,0,0,0.07)";
    root.querySelectorAll("[data-chart]").forEach(function (element) {
      if (element.dataset.drawn) return;
      var data = readJson(element.getAttribute("data-chart"));
      if (!data || !data.x || !data.x.length) {
        element.textContent = "No data in this range.";
        element.classList.add("muted");
        return;
      }
      element.dataset.drawn = "1";
      var bars = element.getAttribute("data-kind") === "bars" && uPlot.paths && uPlot.paths.bars;
      var series = [{}];
      var columns = [data.x];
      data.series.forEach(function (item, index) {
        var color = palette[index % palette.length];
        series.push({
          label: String(item.label), stroke: color, width: 1.5,
          fill: bars ? color + "99" : color + "22",
          paths: bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
          points: { show: false },
        });
        columns.push(item.values);
      });
      var axis = { stroke: axisColor, grid: { stroke: gridColor }, ticks: { stroke: gridColor } };
      var options = {
        width: Math.max(element.clientWidth, 300), height: 200, series: series,
        axes: [Object.assign({}, axis), Object.assign({ size: 60 }, axis)],
        scales: { x: { time: true } }, legend: { live: true },
      };
      var plot = new uPlot(options, columns, element);
      new ResizeObserver(function () { plot.setSize({ width: Math.max(element.clientWidth, 300), height: 200 }); })
        .observe(element);
    });
  }

  // -- raw JSON viewer: a lazily expanded tree built with textContent --------------------------------------------
  function jsonNode(key, value, depth) {
    var item = document.createElement("li");
    if (key !== null) {
      var name = document.createElement("span");
      name.className = "key";
      name.textContent = JSON.stringify(String(key)) + ": ";
      item.appendChild(name);
    }
    if (value !== null && typeof value === "object") {
      var isArray = Array.isArray(value);
      var keys = Object.keys(value);
      var toggle = document.createElement("span");
      toggle.className = "toggle";
      var summary = (isArray ? "[" + keys.length + "]" : "{" + keys.length + "}");
      toggle.textContent = "▸ " + summary;
      item.appendChild(toggle);
      var children = null;
      var open = function () {
        if (children) { children.hidden = !children.hidden; }
        else {
          children = document.createElement("ul");
          keys.forEach(function (childKey) { children.appendChild(jsonNode(isArray ? null : childKey, value[childKey], depth + 1)); });
          item.appendChild(children);
        }
        toggle.textContent = (children.hidden ? "▸ " : "▾ ") + summary;
      };
      toggle.addEventListener("click", open);
      item.expand = open;
      if (depth < 1) open();
    } else {
      var leaf = document.createElement("span");
      leaf.className = value === null ? "null" : typeof value;
      leaf.textContent = typeof value === "string" ? JSON.stringify(value) : String(value);
      item.appendChild(leaf);
    }
    return item;
  }

  function jsonViewers(root) {
    root.querySelectorAll("[data-json-viewer]").forEach(function (details) {
      var loaded = null;
      var tree = details.querySelector("[data-json-tree]");
      details.addEventListener("toggle", function () {
        if (!details.open || loaded) return;
        loaded = fetch(details.getAttribute("data-src"), { credentials: "same-origin" })
          .then(function (response) { return response.json(); })
          .then(function (document_) {
            tree.textContent = "";
            var list = document.createElement("ul");
            list.appendChild(jsonNode(null, document_, 0));
            tree.appendChild(list);
            details.jsonDocument = document_;
          })
          .catch(function (error) { tree.textContent = "Could not load: " + error; });
      });
      var expand = details.querySelector("[data-json-expand]");
      if (expand) expand.addEventListener("click", function () {
        var rounds = 0;
        var step = function () {
          var closed = Array.prototype.filter.call(tree.querySelectorAll("li"), function (li) {
            return li.expand && !li.querySelector(":scope > ul");
          });
          closed.slice(0, 2000).forEach(function (li) { li.expand(); });
          if (closed.length && ++rounds < 12) window.requestAnimationFrame(step);
        };
        if (!details.open) details.open = true;
        window.setTimeout(function () { (loaded || Promise.resolve()).then(step); }, 0);
      });
      var copy = details.querySelector("[data-json-copy]");
      if (copy) copy.addEventListener("click", function () {
        if (details.jsonDocument && navigator.clipboard) {
          navigator.clipboard.writeText(JSON.stringify(details.jsonDocument, null, 2));
          copy.textContent = "copied";
        }
      });
    });
  }

  function toolToggle() {
    var box = document.getElementById("hide-tools");
    var messages = document.getElementById("messages");
    if (box && messages) box.addEventListener("change", function () { messages.classList.toggle("hide-tools", box.checked); });
  }

  // -- live updates -----------------------------------------------------------------------------------------------
  var MAX_ROWS = 200;

  function setStatus(state) {
    var element = document.getElementById("live-status");
    if (!element) return;
    element.setAttribute("data-state", state);
    element.textContent = "live: " + state;
  }

  function liveRows() {
    var rows = document.getElementById("request-rows");
    var staging = document.getElementById("live-staging");
    if (!rows || !staging) return null;
    var filters = rows.getAttribute("data-filters") || "";
    var params = new URLSearchParams(filters);
    var train = params.get("train_id");
    var busy = Promise.resolve();

    function place(row) {
      var id = row.getAttribute("data-id");
      var existing = rows.querySelector('tr[data-id="' + CSS.escape(id) + '"]');
      if (existing) { existing.replaceWith(row); return; }
      var key = Number(row.getAttribute("data-sort"));
      var after = Array.prototype.find.call(rows.children, function (other) {
        return Number(other.getAttribute("data-sort")) < key;
      });
      rows.insertBefore(row, after || null);
      row.classList.add("fresh");
    }

    function fetchRows(ids) {
      var query = new URLSearchParams(filters);
      if (ids) query.set("ids", ids.join(","));
      busy = busy.then(function () {
        return htmx.ajax("GET", "/partials/request-rows?" + query.toString(), { target: staging, swap: "innerHTML" });
      }).then(function () {
        var fresh = Array.prototype.slice.call(staging.querySelectorAll("tr[data-id]"));
        if (!ids) rows.textContent = "";
        fresh.reverse().forEach(place);
        while (rows.children.length > MAX_ROWS) rows.removeChild(rows.lastElementChild);
        staging.textContent = "";
        var empty = document.getElementById("no-requests");
        if (empty && rows.children.length) empty.hidden = true;
        localTimes(rows);
      }).catch(function () { /* the next event or resync retries */ });
    }

    return function (name, data) {
      if (name === "resync" || (data && data.more)) { fetchRows(null); return; }
      var ids = (data.requests || []).filter(function (item) { return !train || item.train === train; })
        .map(function (item) { return item.id; });
      if (ids.length) fetchRows(ids);
    };
  }

  function liveConversation() {
    var body = document.getElementById("conversation-body");
    if (!body) return null;
    var id = body.getAttribute("data-conversation");
    var pending = null;
    function refresh() {
      if (pending) return;
      pending = window.setTimeout(function () {
        pending = null;
        htmx.ajax("GET", body.getAttribute("data-partial"), { target: body, swap: "innerHTML" }).then(function () {
          localTimes(body);
        });
      }, 150);
    }
    return function (name, data) {
      if (name === "resync") { refresh(); return; }
      var hit = (data.requests || []).some(function (item) { return item.conversation === id; });
      if (hit || data.more) refresh();
    };
  }

  function liveNotice() {
    var notice = document.getElementById("live-notice");
    if (!notice) return null;
    var count = 0;
    var counter = notice.querySelector("[data-count]");
    return function (name, data) {
      if (name !== "requests") return;
      count += (data.requests || []).length + (data.more || 0);
      counter.textContent = String(count);
      notice.hidden = count === 0;
    };
  }

  function live() {
    var mode = document.body.getAttribute("data-live");
    if (!mode || typeof EventSource === "undefined") return;
    var handler = mode === "rows" ? liveRows() : mode === "conversation" ? liveConversation() : liveNotice();
    if (!handler) return;
    var source = new EventSource("/sse");
    source.addEventListener("ready", function () { setStatus("on"); });
    source.addEventListener("heartbeat", function () { setStatus("on"); });
    source.addEventListener("requests", function (event) {
      var data;
      try { data = JSON.parse(event.data); } catch (error) { return; }
      handler("requests", data);
    });
    source.addEventListener("resync", function () { handler("resync", {}); });
    source.onerror = function () { setStatus("reconnecting"); };
    window.addEventListener("pagehide", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    charts(document);
    jsonViewers(document);
    toolToggle();
    live();
  });
})();

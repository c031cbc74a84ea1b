// The dashboard: every type from /api/metrics/types, each with a chart of
// its count and average (and p50, p99) over the chosen range, read from
// /api/metrics/series when the chart scrolls into view and kept current
// from /api/metrics/stream. Events carry counts and sums, not percentiles,
// so a chart that received events reads its series again a few seconds
// later for them.
'use strict';

// range name: [seconds shown, step in seconds]
const RANGES = {'5m': [300, 1], '1h': [3600, 10], '24h': [86400, 300], '7d': [604800, 3600]};
const GROUP_COLORS = ['#0550ae', '#bc4c00', '#1a7f37', '#8250df', '#a40e26', '#0e7490', '#953800', '#57606a'];
const PERCENTILE_REFRESH_MS = 5000;
const SVG = 'http://www.w3.org/2000/svg';

const state = {range: '5m', charts: new Map()};
const $ = (sel, el = document) => el.querySelector(sel);

// With AUTH_READS the service wants a token for every read: asked for once
// a read answers 401, kept for this tab, and sent with every read (in the
// query for the stream, whose browser API sends no headers).
const TOKEN_KEY = 'analytics-token';
const token = () => sessionStorage.getItem(TOKEN_KEY) || '';

function headers() {
  const h = {Accept: 'application/json'};
  if (token()) h.Authorization = 'Bearer ' + token();
  return h;
}

// read fetches path, asking for a token on a 401.
async function read(path) {
  const res = await fetch(path, {headers: headers()});
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) askToken(token() ? 'That token was refused.' : 'This dashboard needs a token to read.');
  if (!res.ok) throw new Error(body.detail || res.statusText);
  return {res, body};
}

async function api(path) {
  return (await read(path)).body;
}

function askToken(why) {
  $('#token-why').textContent = why;
  $('#token-form').hidden = false;
}

$('#token-form').addEventListener('submit', e => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('#token').value.trim());
  $('#token').value = '';
  $('#token-form').hidden = true;
  connect();
  loadTypes();
  reloadAll();
});

const seconds = iso => Date.parse(iso) / 1000;
const emptyPoint = t => ({t, count: 0, sum: 0});

function fmt(v) {
  if (v === undefined || !isFinite(v)) return '–';
  const a = Math.abs(v);
  if (a >= 1e6 || (a > 0 && a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toLocaleString();
}

function fmtTime(t, span) {
  const d = new Date(t * 1000);
  return span > 86400 ? d.toLocaleDateString([], {month: 'short', day: 'numeric'}) + ' ' + d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'})
    : d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', second: span <= 3600 ? '2-digit' : undefined});
}

// parseFilter reads "host:web-1 region:eu": pairs separated by spaces or
// commas, each before a name and a colon, so a value may hold either.
function parseFilter(text) {
  return text.trim().split(/[\s,]+(?=[A-Za-z_][A-Za-z0-9_]*:)/).filter(Boolean).map(pair => {
    const i = pair.indexOf(':');
    return i > 0 ? [pair.slice(0, i), pair.slice(i + 1)] : [pair, ''];
  });
}

class Chart {
  constructor(type) {
    this.type = type;
    this.el = $('#chart').content.firstElementChild.cloneNode(true);
    this.svg = $('svg', this.el);
    this.filter = $('.filter', this.el);
    this.group = $('.group', this.el);
    this.error = $('.error', this.el);
    this.legend = $('.legend', this.el);
    this.el.dataset.type = type;
    $('h2', this.el).textContent = type;
    const id = 'title-' + type;
    $('title', this.svg).id = id;
    this.svg.setAttribute('aria-labelledby', id);
    this.svg.dataset.fetches = '0';
    this.visible = false;
    this.stale = true; // what is drawn is not the current range, filter or data
    this.series = null; // [{key, labels, points}] once loaded
    this.refresh = null; // the timer of the percentile refresh
    this.skew = 0; // the server's clock less this one's, in seconds
    this.colors = new Map(); // group key -> colour, kept while grouped
    this.filter.addEventListener('change', () => this.load());
    this.group.addEventListener('change', () => { this.colors.clear(); this.load(); });
    // Labels are read when the choice is opened, so new ones show up.
    this.group.addEventListener('focus', () => this.loadLabels());
  }

  query() {
    const [span, step] = RANGES[state.range];
    // One step short of the span, so that rounded down to the step it
    // still starts where the finest buckets the step needs are kept (the
    // 1 h range's 10 s steps need 1 s buckets, kept for 1 h by default).
    const q = new URLSearchParams({metric_type: this.type, from: `-${span - step}s`, step: `${step}s`});
    for (const [k, v] of parseFilter(this.filter.value)) q.append('label', `${k}:${v}`);
    if (this.group.value) q.set('group_by', this.group.value);
    return q;
  }

  async loadLabels() {
    try {
      const {labels} = await api('api/metrics/labels?' + new URLSearchParams({metric_type: this.type}));
      for (const name of Object.keys(labels)) {
        if (![...this.group.options].some(o => o.value === name)) this.group.add(new Option(name, name));
      }
    } catch { /* the select keeps what it has */ }
  }

  async load() {
    clearTimeout(this.refresh);
    this.refresh = null;
    this.stale = false;
    const seq = this.seq = (this.seq || 0) + 1;
    this.svg.dataset.fetches = String(Number(this.svg.dataset.fetches) + 1);
    try {
      const sent = Date.now();
      const {res, body} = await read('api/metrics/series?' + this.query());
      const date = Date.parse(res.headers.get('Date'));
      if (date) this.skew = (date - (sent + Date.now()) / 2) / 1000;
      if (seq !== this.seq) return; // a newer load is on its way
      this.step = RANGES[state.range][1];
      this.from = seconds(body.from);
      this.to = seconds(body.to);
      const groups = body.groups || [{labels: {}, points: body.points}];
      this.series = groups.map(g => ({
        key: this.group.value ? (g.labels[this.group.value] ?? '') : '',
        labels: g.labels,
        points: g.points.map(p => ({...p, t: seconds(p.time)})),
      }));
      this.error.hidden = true;
      this.advance();
      this.draw();
    } catch (err) {
      this.error.textContent = err.message;
      this.error.hidden = false;
    }
  }

  // apply adds a metric event's points, as the server summed them, to the
  // steps they fall in; a point past the end slides the range along.
  apply(ev) {
    if (!this.series || !this.visible) {
      this.stale = true;
      return;
    }
    if (!parseFilter(this.filter.value).every(([k, v]) => ev.labels[k] === v)) return;
    const by = this.group.value;
    const key = by ? (ev.labels[by] ?? '') : '';
    let s = this.series.find(g => g.key === key);
    if (!s) {
      const points = [];
      for (let t = this.from; t < this.to; t += this.step) points.push(emptyPoint(t));
      s = {key, labels: by && key !== '' ? {[by]: key} : {}, points};
      this.series.push(s);
      this.series.sort((a, b) => (a.key === '' ? -1 : b.key === '' ? 1 : a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    }
    for (const p of ev.points) {
      const t = Math.floor(seconds(p.time) / this.step) * this.step;
      if (t < this.from) continue;
      while (t >= this.to) this.slide();
      const pt = s.points[(t - this.from) / this.step];
      if (!pt) continue;
      pt.min = pt.count ? Math.min(pt.min, p.min) : p.min;
      pt.max = pt.count ? Math.max(pt.max, p.max) : p.max;
      pt.count += p.count;
      pt.sum += p.sum;
      pt.average = pt.sum / pt.count;
    }
    this.svg.dataset.lastEvent = String(Date.now());
    this.draw();
    if (!this.refresh) this.refresh = setTimeout(() => this.load(), PERCENTILE_REFRESH_MS);
  }

  // advance slides the range to the server's present, so a quiet chart
  // moves along too; it reports whether it moved.
  advance() {
    const now = Date.now() / 1000 + this.skew;
    let moved = false;
    while (this.series && now >= this.to) {
      this.slide();
      moved = true;
    }
    return moved;
  }

  slide() {
    for (const s of this.series) {
      s.points.shift();
      s.points.push(emptyPoint(this.to));
    }
    this.from += this.step;
    this.to += this.step;
  }

  draw() {
    const W = 640, left = 52, countBase = 50, countH = 44, valTop = 64, valBottom = 186;
    const n = Math.max(1, Math.round((this.to - this.from) / this.step));
    const x = i => left + (i * (W - left)) / n;
    const counts = new Array(n).fill(0);
    for (const s of this.series) s.points.forEach((p, i) => { counts[i] += p.count; });
    const maxCount = Math.max(1, ...counts);
    const grouped = Boolean(this.group.value);
    const colorOf = key => {
      if (!this.colors.has(key)) this.colors.set(key, GROUP_COLORS[this.colors.size % GROUP_COLORS.length]);
      return this.colors.get(key);
    };
    const lines = grouped
      ? this.series.map(s => ({cls: 'group', color: colorOf(s.key), field: 'average', s}))
      : ['average', 'p50', 'p99'].map((field, i) => ({cls: field, color: ['#0550ae', '#1a7f37', '#bc4c00'][i], field, s: this.series[0]}));
    let lo = Infinity, hi = -Infinity;
    for (const l of lines) {
      for (const p of l.s ? l.s.points : []) {
        if (p.count && p[l.field] !== undefined) { lo = Math.min(lo, p[l.field]); hi = Math.max(hi, p[l.field]); }
      }
    }
    if (lo === Infinity) { lo = 0; hi = 1; }
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const y = v => valBottom - ((v - lo) / (hi - lo)) * (valBottom - valTop);

    const el = (name, attrs, text) => {
      const e = document.createElementNS(SVG, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const title = $('title', this.svg);
    this.svg.replaceChildren(title);
    this.svg.append(
      el('line', {class: 'grid', x1: left, x2: W, y1: countBase, y2: countBase}),
      el('line', {class: 'grid', x1: left, x2: W, y1: valBottom, y2: valBottom}),
      el('text', {class: 'axis', x: 0, y: countBase - countH + 10}, fmt(maxCount)),
      el('text', {class: 'axis', x: 0, y: valTop + 10}, fmt(hi)),
      el('text', {class: 'axis', x: 0, y: valBottom}, fmt(lo)),
      el('text', {class: 'axis', x: left, y: 204}, fmtTime(this.from, this.to - this.from)),
      el('text', {class: 'axis', x: W, y: 204, 'text-anchor': 'end'}, fmtTime(this.to, this.to - this.from)),
    );
    const barW = Math.max(0.5, (W - left) / n - (n <= 150 ? 1 : 0));
    let bars = '';
    counts.forEach((c, i) => {
      if (c) bars += `M${x(i).toFixed(1)} ${countBase}V${(countBase - (c / maxCount) * countH).toFixed(1)}h${barW.toFixed(2)}V${countBase}Z`;
    });
    this.svg.append(el('path', {class: 'count', d: bars || 'M0 0', fill: '#9fb8d6'}));
    for (const l of lines) {
      // Empty steps are bridged; a line of one point is drawn as a dot
      // (a zero-length segment with a round cap).
      let d = '', pen = 'M', drawn = 0;
      (l.s ? l.s.points : []).forEach((p, i) => {
        const v = p[l.field];
        if (!p.count || v === undefined) return;
        d += `${pen}${(x(i) + barW / 2).toFixed(1)} ${y(v).toFixed(1)}`;
        pen = 'L';
        drawn++;
      });
      if (drawn === 1) d += 'h0.01';
      this.svg.append(el('path', {class: l.cls, d: d || 'M0 0', fill: 'none', stroke: l.color, 'stroke-width': drawn === 1 ? 4 : 1.6,
        'stroke-linecap': 'round', 'stroke-linejoin': 'round'}));
    }

    const total = counts.reduce((a, b) => a + b, 0);
    this.svg.dataset.points = String(n);
    this.svg.dataset.total = String(total);
    this.svg.dataset.step = String(this.step);
    const last = this.series[0] && [...this.series[0].points].reverse().find(p => p.count);
    title.textContent = `${this.type}: ${total} samples in the last ${state.range}` +
      (last && !grouped ? `; latest average ${fmt(last.average)}` : '');
    this.legend.replaceChildren();
    const key = (color, text) => {
      const k = document.createElement('span');
      k.className = 'key';
      k.style.background = color;
      this.legend.append(k, document.createTextNode(text));
    };
    key('#9fb8d6', `count (max ${fmt(maxCount)} per ${this.step}s)`);
    for (const l of lines) {
      key(l.color, grouped ? `${this.group.value}=${l.s.key || '(none)'}` : (l.field === 'average' ? 'average' : l.field));
    }
  }
}

// ---- the list of types ----

let typesTimer = null;

async function loadTypes() {
  typesTimer = null;
  let types;
  const problem = $('#problem');
  try {
    ({types} = await api('api/metrics/types'));
  } catch (err) {
    problem.textContent = 'Cannot list the types: ' + err.message;
    problem.hidden = false;
    return;
  }
  problem.hidden = true;
  const list = $('#types');
  const names = types.map(t => t.type);
  const kept = new Set(names);
  for (const [name, c] of state.charts) {
    if (kept.has(name)) continue; // a type with no data left goes
    observer.unobserve(c.el);
    c.el.remove();
    clearTimeout(c.refresh);
    state.charts.delete(name);
  }
  for (const name of names) {
    if (state.charts.has(name)) continue;
    const c = new Chart(name);
    state.charts.set(name, c);
    const next = [...state.charts.keys()].filter(n => n > name).sort()[0];
    list.insertBefore(c.el, next ? state.charts.get(next).el : null);
    observer.observe(c.el);
  }
  $('#empty').hidden = state.charts.size > 0;
  applySearch();
  document.body.dataset.types = String(state.charts.size);
}

function scheduleTypes() {
  if (!typesTimer) typesTimer = setTimeout(loadTypes, 500);
}

function applySearch() {
  const prefix = $('#search').value.trim();
  for (const [name, c] of state.charts) c.el.hidden = !name.startsWith(prefix);
}

// Charts load when they scroll into view, so a hundred types cost what the
// few on screen do.
const observer = new IntersectionObserver(entries => {
  for (const e of entries) {
    const c = state.charts.get(e.target.dataset.type);
    c.visible = e.isIntersecting;
    if (c.visible && c.stale) c.load();
  }
}, {rootMargin: '200px'});

function reloadAll() {
  for (const c of state.charts.values()) {
    c.stale = true;
    if (c.visible) c.load();
  }
}

// ---- the stream ----

function setStatus(st, text) {
  const el = $('#status');
  el.dataset.state = st;
  el.textContent = text;
  document.body.dataset.stream = st;
}

let connectedOnce = false;
let stream = null;

function connect() {
  if (stream) stream.close();
  const es = stream = new EventSource('api/metrics/stream' + (token() ? '?access_token=' + encodeURIComponent(token()) : ''));
  es.addEventListener('hello', () => {
    setStatus('live', 'Live');
    // What happened while disconnected came as no event: read it again.
    if (connectedOnce) { scheduleTypes(); reloadAll(); }
    connectedOnce = true;
  });
  es.addEventListener('metric', e => {
    const ev = JSON.parse(e.data);
    const c = state.charts.get(ev.type);
    if (c) c.apply(ev); else scheduleTypes();
  });
  es.addEventListener('resync', e => {
    const ev = JSON.parse(e.data);
    const c = ev.type && state.charts.get(ev.type);
    if (!ev.type) { scheduleTypes(); reloadAll(); return; }
    if (!c) { scheduleTypes(); return; }
    c.stale = true;
    if (c.visible) c.load();
  });
  es.onerror = () => {
    setStatus('disconnected', 'Disconnected: reconnecting…');
    // EventSource retries by itself, except after an answer that is not a
    // stream (such as 503 for too many streams).
    // A refused token is one such answer: a read shows why, and asks.
    if (es.readyState === EventSource.CLOSED) {
      if (token()) read('api/metrics/types').catch(() => {});
      setTimeout(() => { if (stream === es) connect(); }, 5000);
    }
  };
}

$('#controls').addEventListener('change', e => {
  if (e.target.name !== 'range') return;
  state.range = e.target.value;
  reloadAll();
});
$('#controls').addEventListener('submit', e => e.preventDefault());
$('#search').addEventListener('input', applySearch);

// Once a second, quiet charts move along with the clock; once a minute
// the list of types is read again, for types that appeared or aged out
// without an event saying so.
setInterval(() => {
  for (const c of state.charts.values()) if (c.visible && c.advance()) c.draw();
}, 1000);
setInterval(loadTypes, 60000);

connect();
loadTypes();

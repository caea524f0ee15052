// jobs.js: the jobs page, live over the event stream: each job's type, image,
// status, progress with rate and ETA, times, errors in full; pause, resume,
// cancel, dismiss; a finished check's report as a table.
import { call, enc } from './api.js';
import { el, clear, fmtBytes, fmtDuration, fmtTime, toast, pager } from './util.js';

const PAGE = 100;
const ui = { status: 'all', q: '', page: 0 };
const BYTE_JOBS = new Set(['convert', 'commit']);

const CHECK_FIELDS = [
  ['check-errors', 'Errors during the check'], ['corruptions', 'Corruptions'], ['leaks', 'Leaked clusters'],
  ['corruptions-fixed', 'Corruptions fixed'], ['leaks-fixed', 'Leaks fixed'], ['total-clusters', 'Clusters (disk)'],
  ['allocated-clusters', 'Allocated clusters'], ['fragmented-clusters', 'Fragmented clusters'],
  ['compressed-clusters', 'Compressed clusters'], ['image-end-offset', 'Image end offset'],
];

// A check's report readably: a verdict, then its counts; other results as JSON.
export function resultView(j) {
  const r = j.result;
  if (!r) return null;
  if (j.type === 'check') {
    const bad = (r.corruptions || 0) - (r['corruptions-fixed'] || 0), leaks = (r.leaks || 0) - (r['leaks-fixed'] || 0);
    const verdict = bad > 0 ? `${bad} corruption(s) remain: run a check with repair "all"` :
      leaks > 0 ? `no corruption; ${leaks} leaked cluster(s) (harmless; repair "leaks" frees them)` :
        r['check-errors'] ? `${r['check-errors']} error(s) while checking` : 'No errors were found on the image.';
    return el('div.report', { dataset: { report: j.id } },
      el('p', { className: bad > 0 || r['check-errors'] ? 'error' : 'okay' }, el('strong', 'Check report: '), verdict),
      el('dl', CHECK_FIELDS.filter(([k]) => r[k] !== undefined).map(([k, label]) =>
        [el('dt', label), el('dd', k === 'image-end-offset' ? `${r[k]} (${fmtBytes(r[k])})` : String(r[k]))])));
  }
  return el('div.report', el('strong', 'Result: '), el('code', JSON.stringify(r)));
}

function progress(j) {
  const cur = j['current-progress'], tot = j['total-progress'];
  const pct = tot ? Math.min(100, (100 * cur) / tot) : j.status === 'concluded' && !j.error ? 100 : 0;
  const bytes = BYTE_JOBS.has(j.type);
  const rate = j.status === 'running' && j._rate > 0 ? j._rate : null;
  const eta = rate && tot ? (tot - cur) / rate : NaN;
  return el('div.progress',
    el('progress', { max: 100, value: pct, 'aria-label': `Job ${j.id} progress` }),
    el('span.pct', pct.toFixed(pct < 10 && pct > 0 ? 1 : 0) + '%'),
    el('small.muted', (!tot ? (j.status === 'concluded' ? '' : 'not started') : bytes ? `${fmtBytes(cur)} of ${fmtBytes(tot)}` : `${cur} of ${tot}`) +
      (rate ? ` · ${bytes ? fmtBytes(rate) + '/s' : rate.toFixed(1) + '/s'} · ETA ${fmtDuration(eta)}` : '')));
}

async function act(j, what) {
  try {
    if (what === 'dismiss') await call('DELETE', '/v1/jobs/' + enc(j.id));
    else await call('POST', `/v1/jobs/${enc(j.id)}/${what}`, {});
    toast(`job ${j.id}: ${what} sent`);
  } catch (e) { toast(`job ${j.id}: ${e.describe()}`, 'error'); }
}

function actions(store, j) {
  if (!store.can('operator')) return null;
  const b = (what, label, cls = '') => el('button.small' + cls, { type: 'button', onclick: () => act(j, what), 'aria-label': `${label} job ${j.id}` }, label);
  const out = [];
  if (j.status === 'running') out.push(b('pause', 'Pause'));
  if (j.status === 'paused') out.push(b('resume', 'Resume'));
  if (j.status === 'created' || j.status === 'running' || j.status === 'paused') out.push(b('cancel', 'Cancel', '.danger'));
  if (j.status === 'concluded') out.push(b('dismiss', 'Dismiss'));
  return out;
}

function statusText(j) {
  if (j.status !== 'concluded') return { cls: j.status === 'paused' ? 'warn' : 'busy', text: j.status };
  if (j.cancelled) return { cls: 'warn', text: 'cancelled' };
  if (j.error) return { cls: 'bad', text: 'failed' };
  return { cls: 'ok', text: 'concluded' };
}

function card(store, j) {
  const st = statusText(j);
  const p = Object.entries(j.params || {}).map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' ');
  return el('article.job', { dataset: { id: j.id, status: j.status }, 'aria-label': `Job ${j.id}` },
    el('div.jobhead',
      el('strong', `#${j.id} ${j.type}`), ' ',
      el('a', { href: '#/image/' + enc(j.image) }, j.image), ' ',
      el('span.badge.' + st.cls, { dataset: { status: j.status } }, st.text),
      p ? el('small.muted', ' ' + p) : null,
      el('span.actions', actions(store, j))),
    progress(j),
    el('div.times.muted',
      el('span', 'created ' + fmtTime(j.created)), el('span', 'started ' + fmtTime(j.started)),
      el('span', 'finished ' + fmtTime(j.finished)),
      j.started && j.finished ? el('span', 'took ' + fmtDuration((new Date(j.finished) - new Date(j.started)) / 1000)) : null),
    j.error ? el('pre.error', { role: j.status === 'concluded' ? undefined : 'alert' }, j.error) : null,
    resultView(j));
}

function visible(store) {
  const q = ui.q.toLowerCase();
  return [...store.jobs.values()].filter((j) => {
    if (ui.status === 'active' && j.status === 'concluded') return false;
    if (ui.status === 'concluded' && j.status !== 'concluded') return false;
    if (ui.status === 'failed' && !(j.status === 'concluded' && j.error)) return false;
    return !q || j.image.toLowerCase().includes(q) || j.type.includes(q) || j.id === q;
  }).sort((a, b) => b.id - a.id);
}

export function render(main, store) {
  const list = el('div.jobs', { 'aria-live': 'off' });
  const pagerBox = el('div');
  const counts = el('p.muted');
  const status = el('select', { 'aria-label': 'Show' }, ['all', 'active', 'concluded', 'failed'].map((s) => el('option', { value: s, selected: s === ui.status }, 'Show: ' + s)));
  const search = el('input', { type: 'search', placeholder: 'Image, type or id', value: ui.q, 'aria-label': 'Search jobs' });
  const cards = new Map(); // id -> element on the page now
  let frame = 0;
  const dirty = new Set();
  let all = true;
  const draw = () => {
    frame = 0;
    if (all) {
      const t0 = performance.now();
      all = false;
      dirty.clear();
      const vs = visible(store);
      const pages = Math.max(1, Math.ceil(vs.length / PAGE));
      if (ui.page >= pages) ui.page = pages - 1;
      cards.clear();
      clear(list, vs.slice(ui.page * PAGE, (ui.page + 1) * PAGE).map((j) => {
        const c = card(store, j);
        cards.set(j.id, c);
        return c;
      }));
      if (!vs.length) list.append(el('p.muted', store.jobs.size ? 'No job matches.' : 'No jobs yet: start one from an image\'s page.'));
      clear(pagerBox, pager(vs.length, ui.page, PAGE, (p) => { ui.page = p; all = true; draw(); }));
      list.dataset.drawMs = (performance.now() - t0).toFixed(1); // the last full redraw (tests print it)
    } else {
      for (const id of dirty) {
        const j = store.jobs.get(id), old = cards.get(id);
        if (!j || !old) continue;
        const c = card(store, j);
        // keep the keyboard focus on the same button across the redraw
        const focused = old.contains(document.activeElement) && document.activeElement.getAttribute('aria-label');
        old.replaceWith(c);
        cards.set(id, c);
        if (focused) { const b = c.querySelector(`[aria-label="${CSS.escape(focused)}"]`); if (b) b.focus(); }
      }
      dirty.clear();
    }
    let active = 0;
    for (const j of store.jobs.values()) if (j.status !== 'concluded') active++;
    counts.textContent = `${store.jobs.size} jobs · ${active} active`;
  };
  const redraw = (id) => {
    if (id === undefined) all = true;
    else if (!cards.has(id)) all = true; // a new job, or one entering the filter
    else dirty.add(id);
    if (!frame) frame = requestAnimationFrame(draw);
  };
  status.addEventListener('change', () => { ui.status = status.value; ui.page = 0; redraw(); });
  search.addEventListener('input', () => { ui.q = search.value.trim(); ui.page = 0; redraw(); });
  const dismissAll = store.can('operator') ? el('button', {
    type: 'button', onclick: async () => {
      for (const j of [...store.jobs.values()]) if (j.status === 'concluded') await act(j, 'dismiss');
    },
  }, 'Dismiss finished') : null;
  clear(main, el('div.titlebar', el('h1', 'Jobs'), counts, el('div.buttons', dismissAll)),
    el('div.toolbar', status, search), list, pagerBox);
  const unwatch = store.watch((kind, key) => {
    if (kind === 'job') redraw(key);
    else if (kind === 'jobs') { redraw(); if (store.jobsLoaded) requestAnimationFrame(ready); }
  });
  draw();
  const ready = () => {
    if (document.body.dataset.ready === 'jobs') return;
    document.body.dataset.ready = 'jobs';
    performance.mark('qcowd-interactive');
  };
  if (store.jobsLoaded) ready();
  // rates and ETAs age: refresh the running ones each second
  const tick = setInterval(() => { for (const j of store.jobs.values()) if (j.status === 'running' && cards.has(j.id)) redraw(j.id); }, 1000);
  return { destroy() { unwatch(); clearInterval(tick); delete document.body.dataset.ready; } };
}

// catalog.js: the catalog page: every image with its sizes, format, backing
// chain (as a tree of who shares a base), snapshots, bitmaps and state; search,
// sort and pages; create, upload with progress, delete.
import { call, enc, upload, uploadOffset, ApiError } from './api.js';
import { el, clear, fmtBytes, parseSize, toast, modal, confirmDialog, field, pager, collator } from './util.js';

const PAGE = 100;
const ui = { q: '', sort: 'name', desc: false, tree: false, page: 0 }; // kept across visits
const uploads = []; // {name, file, sent, total, state, error, try, xhr, t0}

function fs(i) { return (i['format-specific'] && i['format-specific'].data) || {}; }
export function backingName(i) {
  const b = i['backing-filename'];
  return b ? b.replace(/\.qcow2$/, '') : null;
}

// The state of an image as words and a class: error, corrupt, dirty, busy, ok.
export function imageState(store, i) {
  if (i.error) return { cls: 'bad', text: i.error.code, title: i.error.message };
  if (fs(i).corrupt) return { cls: 'bad', text: 'corrupt', title: 'the corrupt bit is set: reads go on, writes are refused' };
  const busy = store.busy(i.name);
  if (busy.length) return { cls: 'busy', text: 'busy', title: busy.map((j) => `job ${j.id} ${j.type} (${j.status})`).join(', ') };
  if (i['dirty-flag']) return { cls: 'warn', text: 'dirty', title: 'left dirty by a crash: run a check with repair' };
  return { cls: 'ok', text: 'ok', title: '' };
}

export function formatSummary(i) {
  const d = fs(i);
  if (i.error) return '';
  const parts = [d.compat === '0.10' ? 'v2' : 'v3', fmtBytes(i['cluster-size'])];
  if (d['compression-type']) parts.push(d['compression-type']);
  if (d['refcount-bits'] && d['refcount-bits'] !== 16) parts.push(d['refcount-bits'] + '-bit refcounts');
  if (d['extended-l2']) parts.push('extended L2');
  if (d['lazy-refcounts']) parts.push('lazy refcounts');
  return parts.join(' · ');
}

const SORTS = {
  name: (a, b) => collator.compare(a.name, b.name),
  'virtual-size': (a, b) => (a['virtual-size'] || 0) - (b['virtual-size'] || 0),
  'actual-size': (a, b) => (a['actual-size'] || 0) - (b['actual-size'] || 0),
  snapshots: (a, b) => (a.snapshots || []).length - (b.snapshots || []).length,
  bitmaps: (a, b) => (fs(a).bitmaps || []).length - (fs(b).bitmaps || []).length,
  state: (a, b) => (a.error ? 0 : 1) - (b.error ? 0 : 1) || collator.compare(a.name, b.name),
};

// Rows to show: [{img, depth, kids}] filtered, sorted, or in backing-tree order.
function rows(store) {
  const q = ui.q.toLowerCase();
  const all = [...store.images.values()];
  const kids = new Map();
  for (const i of all) {
    const b = backingName(i);
    if (b && store.images.has(b)) (kids.get(b) || kids.set(b, []).get(b)).push(i);
  }
  const cmp = SORTS[ui.sort];
  const order = (list) => list.sort((a, b) => (ui.desc ? -1 : 1) * cmp(a, b));
  let out = [];
  if (ui.tree) {
    const walk = (i, depth, seen) => {
      if (seen.has(i.name)) return;
      seen.add(i.name);
      out.push({ img: i, depth, kids: (kids.get(i.name) || []).length });
      for (const k of order(kids.get(i.name) || [])) walk(k, depth + 1, seen);
    };
    const seen = new Set();
    for (const i of order(all.filter((i) => !backingName(i) || !store.images.has(backingName(i))))) walk(i, 0, seen);
    for (const i of order(all)) walk(i, 0, seen); // a backing loop: still listed
  } else {
    out = order(all).map((i) => ({ img: i, depth: 0, kids: (kids.get(i.name) || []).length }));
  }
  return q ? out.filter((r) => r.img.name.toLowerCase().includes(q)) : out;
}

function row(store, r) {
  const i = r.img, st = imageState(store, i), d = fs(i), b = backingName(i);
  const name = el('td.name', { style: r.depth ? `--depth:${r.depth}` : undefined },
    r.depth ? el('span.branch', { 'aria-hidden': 'true' }, '└ ') : null,
    el('a', { href: '#/image/' + enc(i.name) }, i.name),
    r.kids ? el('span.muted', ` (base of ${r.kids})`) : null);
  return el('tr', { dataset: { name: i.name } },
    name,
    el('td.num', { dataset: { label: 'Virtual' } }, i.error ? '–' : fmtBytes(i['virtual-size'])),
    el('td.num', { dataset: { label: 'Allocated' } }, i.error ? '–' : fmtBytes(i['actual-size'])),
    el('td.fmt', { dataset: { label: 'Format' } }, i.error ? el('span.error', i.error.message) : formatSummary(i)),
    el('td', { dataset: { label: 'Backing' } }, b ? el('a', { href: '#/image/' + enc(b) }, b) : '–'),
    el('td.num', { dataset: { label: 'Snapshots' } }, i.error ? '–' : String((i.snapshots || []).length)),
    el('td.num', { dataset: { label: 'Bitmaps' } }, i.error ? '–' : String((d.bitmaps || []).length)),
    el('td', { dataset: { label: 'State' } }, el('span.badge.' + st.cls, { title: st.title }, st.text)),
    el('td.actions', store.can('admin') ? el('button.small.danger', { type: 'button', onclick: () => remove(i.name), 'aria-label': 'Delete ' + i.name }, 'Delete') : null));
}

async function remove(name) {
  if (!await confirmDialog('Delete ' + name + '?', `The image ${name} and its snapshots and bitmaps are deleted for good.`)) return;
  try {
    await call('DELETE', '/v1/images/' + enc(name));
    toast(name + ' deleted');
  } catch (e) { toast(e.describe(), 'error'); }
}

async function create(store) {
  const backing = el('select', { name: 'backing' }, el('option', { value: '' }, '(none)'),
    [...store.images.values()].filter((i) => !i.error).map((i) => el('option', { value: i.name }, i.name)));
  const body = el('div.form',
    field('Name', el('input', { name: 'name', required: true, pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}', autocomplete: 'off' })),
    field('Size', el('input', { name: 'size', placeholder: '10G', autocomplete: 'off' }), 'e.g. 64M, 10G; empty with a backing image: its size'),
    field('Backing image', backing),
    field('Cluster size', el('select', { name: 'cluster' }, ['', '4096', '16384', '65536', '262144', '1048576', '2097152'].map((v) => el('option', { value: v }, v ? fmtBytes(+v) : 'default (64 KiB)')))),
    field('Compression', el('select', { name: 'compression' }, ['', 'zlib', 'zstd'].map((v) => el('option', { value: v }, v || 'default (zlib)')))),
    el('label.check', el('input', { type: 'checkbox', name: 'l2' }), ' Extended L2 (subclusters)'));
  await modal('Create an image', body, [{ label: 'Cancel', value: null }, { label: 'Create', value: 'create', primary: true }], async (form) => {
    const f = form.elements, req = { name: f.name.value.trim() };
    if (f.size.value.trim()) {
      req.size = parseSize(f.size.value);
      if (Number.isNaN(req.size)) return 'The size is not a number of bytes (64M, 10G, ...).';
    }
    if (f.backing.value) req['backing-file'] = f.backing.value;
    if (f.cluster.value) req['cluster-size'] = +f.cluster.value;
    if (f.compression.value) req['compression-type'] = f.compression.value;
    if (f.l2.checked) req['extended-l2'] = true;
    try {
      await call('POST', '/v1/images', req);
    } catch (e) { return e.describe(); }
    toast(req.name + ' created');
    store.refreshImage(req.name);
    return null;
  });
}

// The end of an upload u: done (the row leaves the list after a while), failed,
// or, after a broken connection, go() again in 2 s while tries remain (true).
function uploaded(store, u, what, redraw) {
  u.state = 'done';
  u.error = null;
  toast(`${u.name} uploaded (${what})`);
  store.refreshImage(u.name);
  setTimeout(() => { uploads.splice(uploads.indexOf(u), 1); redraw(); }, 4000);
  redraw();
}
function failed(u, e, redraw) {
  u.state = e.code === 'aborted' ? 'cancelled' : 'failed';
  u.error = e;
  redraw();
}
function retryLater(u, e, tries, go, redraw) {
  if (e.status !== 0 || e.code !== 'network-error' || u.try >= tries) return false;
  u.try++;
  u.state = 'retrying';
  u.error = e;
  redraw();
  setTimeout(go, 2000);
  return true;
}

// Uploads run on the page (the dialog only picks the file); after a broken
// connection (up to 3 times) the page asks qcowd how much of the file it kept and
// sends the rest from there (u.resumedAt: where the last try started).
function startUpload(store, name, file, redraw) {
  const u = { name, file, sent: 0, total: file.size, state: 'uploading', error: null, try: 1, t0: performance.now(), resumedAt: 0 };
  uploads.push(u);
  const go = async () => {
    u.state = 'uploading';
    let from = 0;
    if (u.try > 1 && file.size > 0) {
      try {
        from = await uploadOffset(name, file.size);
      } catch (e) {
        if (!retryLater(u, e, 3, go, redraw)) failed(u, e, redraw);
        return;
      }
    }
    u.resumedAt = from;
    u.sent = from;
    u.t0 = performance.now();
    u.t0Bytes = from;
    u.xhr = upload(name, file, (sent, total) => { u.sent = sent; u.total = total; redraw(); }, from);
    u.xhr.then(() => uploaded(store, u, fmtBytes(file.size), redraw),
      (e) => { if (!retryLater(u, e, 3, go, redraw)) failed(u, e, redraw); });
  };
  u.retry = () => { u.try = 1; u.error = null; go(); redraw(); };
  go();
  redraw();
}

function uploadView(redraw) {
  if (!uploads.length) return null;
  return el('section.uploads', { 'aria-label': 'Uploads' }, uploads.map((u) => {
    const pct = u.total ? Math.floor((100 * u.sent) / u.total) : 0;
    const secs = (performance.now() - u.t0) / 1000;
    const rate = secs > 0.2 ? (u.sent - (u.t0Bytes || 0)) / secs : 0;
    const eta = rate > 0 ? (u.total - u.sent) / rate : NaN;
    return el('div.upload', { dataset: { name: u.name, state: u.state, resumedAt: String(u.resumedAt || 0) } },
      el('strong', u.name), ' ',
      el('progress', { max: 100, value: pct, 'aria-label': 'Upload of ' + u.name }), ' ',
      el('span.pct', pct + '%'), ' ',
      el('span.muted', `${fmtBytes(u.sent)} of ${fmtBytes(u.total)}` + (u.state === 'uploading' && rate ? ` · ${fmtBytes(rate)}/s · ${Math.ceil(eta)} s left` : '')), ' ',
      el('span.badge.' + (u.state === 'failed' ? 'bad' : u.state === 'done' ? 'ok' : 'busy'),
        u.state !== 'retrying' ? u.state : u.raw ? `connection lost, resuming at ${fmtBytes(u.sent)} (try ${u.try} of 5)` : `connection lost, resuming (try ${u.try} of 3)`),
      u.state === 'uploading' ? el('button.small', { type: 'button', onclick: () => u.xhr.abort() }, 'Cancel') : null,
      u.state === 'failed' || u.state === 'cancelled' ? [
        el('button.small', { type: 'button', onclick: u.retry }, u.raw && u.sent ? `Resume at ${fmtBytes(u.sent)}` : 'Retry'),
        el('button.small', { type: 'button', onclick: () => { uploads.splice(uploads.indexOf(u), 1); redraw(); } }, 'Dismiss')] : null,
      u.error && u.state !== 'cancelled' ? el('p.error', u.error.describe()) : null);
  }));
}

// A raw disk file goes in as a new qcow2 image written range by range (PUT
// .../data), so a broken connection resumes at the first range not acknowledged;
// ranges of zeroes are skipped (the image stays sparse).
const CHUNK = 4 << 20;
function startRawUpload(store, name, file, redraw) {
  const u = { name, file, sent: 0, total: file.size, state: 'uploading', error: null, try: 1, t0: performance.now(), raw: true, created: false, stop: false };
  uploads.push(u);
  const path = '/v1/images/' + enc(name);
  const go = async () => {
    u.state = 'uploading';
    redraw();
    try {
      if (!u.created) {
        await call('POST', '/v1/images', { name, size: Math.ceil(file.size / 512) * 512 });
        u.created = true;
      }
      while (u.sent < file.size) {
        if (u.stop) throw new ApiError(0, 'aborted', 'upload cancelled', null);
        const n = Math.min(CHUNK, file.size - u.sent);
        const buf = new Uint8Array(await file.slice(u.sent, u.sent + n).arrayBuffer());
        if (buf.some((b) => b !== 0)) {
          await call('PUT', `${path}/data?flush=n`, buf, { 'Content-Range': `bytes ${u.sent}-${u.sent + n - 1}/*`, 'Content-Type': 'application/octet-stream' });
        }
        u.sent += n;
        u.try = 1;
        redraw();
      }
      await call('PATCH', `${path}/data`, { op: 'flush' });
    } catch (e) {
      if (!retryLater(u, e, 5, go, redraw)) failed(u, e, redraw);
      return;
    }
    uploaded(store, u, `${fmtBytes(file.size)} raw`, redraw);
  };
  u.xhr = { abort: () => { u.stop = true; } };
  u.retry = () => { u.try = 1; u.stop = false; u.error = null; go(); };
  go();
}

async function isQcow2(file) {
  const b = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  return b[0] === 0x51 && b[1] === 0x46 && b[2] === 0x49 && b[3] === 0xfb; // "QFI\xfb"
}

async function pickUpload(store, redraw) {
  const file = el('input', { type: 'file', name: 'file', required: true, accept: '.qcow2,.img,application/octet-stream' });
  const name = el('input', { name: 'name', required: true, autocomplete: 'off' });
  file.addEventListener('change', () => {
    if (file.files[0] && !name.value) name.value = file.files[0].name.replace(/\.(qcow2|img)$/, '').replace(/[^A-Za-z0-9._-]/g, '_');
  });
  await modal('Upload an image', el('div.form', field('File', file, 'a qcow2 file is stored as it is; a raw disk file becomes a new qcow2 image, sent in ranges that resume after a broken connection'), field('Image name', name)),
    [{ label: 'Cancel', value: null }, { label: 'Upload', value: 'up', primary: true }], async () => {
      const f = file.files[0];
      if (!f) return 'Pick a file.';
      if (await isQcow2(f)) startUpload(store, name.value.trim(), f, redraw);
      else startRawUpload(store, name.value.trim(), f, redraw);
      return null;
    });
}

export function render(main, store) {
  const search = el('input', { type: 'search', placeholder: 'Search names', value: ui.q, 'aria-label': 'Search images' });
  const sort = el('select', { 'aria-label': 'Sort by' }, Object.keys(SORTS).map((k) => el('option', { value: k, selected: k === ui.sort }, 'Sort: ' + k)));
  const dir = el('button', { type: 'button', 'aria-label': 'Sort order' }, ui.desc ? '↓ descending' : '↑ ascending');
  const tree = el('input', { type: 'checkbox', checked: ui.tree });
  const table = el('table.catalog', el('thead', el('tr',
    ['Name', 'Virtual', 'Allocated', 'Format', 'Backing', 'Snapshots', 'Bitmaps', 'State', ''].map((h) => el('th', { scope: 'col' }, h)))));
  const tbody = el('tbody');
  table.append(tbody);
  const upl = el('div');
  const pagerBox = el('div');
  const summary = el('p.muted');
  let frame = 0, upFrame = 0;
  const draw = () => {
    frame = 0;
    const t0 = performance.now();
    const rs = rows(store);
    const pages = Math.max(1, Math.ceil(rs.length / PAGE));
    if (ui.page >= pages) ui.page = pages - 1;
    const slice = rs.slice(ui.page * PAGE, (ui.page + 1) * PAGE);
    clear(tbody, slice.map((r) => row(store, r)));
    if (!rs.length) tbody.append(el('tr', el('td', { colSpan: 9 }, store.imagesLoaded ? 'No image matches.' : 'Loading…')));
    clear(pagerBox, pager(rs.length, ui.page, PAGE, (p) => { ui.page = p; draw(); }));
    let virt = 0, act = 0;
    for (const i of store.images.values()) { virt += i['virtual-size'] || 0; act += i['actual-size'] || 0; }
    summary.textContent = `${store.images.size} images · ${fmtBytes(virt)} virtual · ${fmtBytes(act)} allocated`;
    table.dataset.drawMs = (performance.now() - t0).toFixed(1); // the last redraw (tests print it)
  };
  const redraw = () => { if (!frame) frame = requestAnimationFrame(draw); };
  const drawUploads = () => { upFrame = 0; clear(upl, uploadView(redrawUploads)); };
  const redrawUploads = () => { if (!upFrame) upFrame = requestAnimationFrame(drawUploads); };
  search.addEventListener('input', () => { ui.q = search.value; ui.page = 0; redraw(); });
  sort.addEventListener('change', () => { ui.sort = sort.value; redraw(); });
  dir.addEventListener('click', () => { ui.desc = !ui.desc; dir.textContent = ui.desc ? '↓ descending' : '↑ ascending'; redraw(); });
  tree.addEventListener('change', () => { ui.tree = tree.checked; ui.page = 0; redraw(); });
  clear(main,
    el('div.titlebar', el('h1', 'Catalog'), summary,
      el('div.buttons',
        store.can('admin') ? el('button.primary', { type: 'button', onclick: () => create(store) }, 'Create image') : null,
        store.can('admin') ? el('button', { type: 'button', onclick: () => pickUpload(store, redrawUploads) }, 'Upload') : null)),
    upl,
    el('div.toolbar', search, sort, dir, el('label.check', tree, ' Backing tree')),
    el('div.scroll', table), pagerBox);
  // jobs change only the busy badges: redraw for them at most twice a second, so
  // hundreds of running jobs' progress events do not keep the page busy
  let jobTimer = 0;
  const unwatch = store.watch((kind) => {
    if (kind === 'images' || kind === 'image') redraw();
    else if ((kind === 'job' || kind === 'jobs') && !jobTimer) jobTimer = setTimeout(() => { jobTimer = 0; redraw(); }, 500);
  });
  drawUploads();
  draw();
  const ready = () => {
    document.body.dataset.ready = 'catalog';
    performance.mark('qcowd-interactive');
  };
  if (!store.imagesLoaded) {
    store.loadImages().then(() => { draw(); ready(); }, (e) => clear(tbody, el('tr', el('td.error', { colSpan: 9, role: 'alert' }, e.describe()))));
  } else ready();
  const tick = setInterval(() => { if (uploads.some((u) => u.state === 'uploading')) redrawUploads(); }, 500);
  return { destroy() { unwatch(); clearInterval(tick); clearTimeout(jobTimer); delete document.body.dataset.ready; } };
}

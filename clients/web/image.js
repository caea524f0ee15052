// image.js: one image: its info and backing chain, the allocation map drawn from
// /extents, snapshots (create, revert, delete, download), bitmaps (add, clear,
// enable, disable, merge, delete, the dirty map) and the actions that start jobs
// (commit with a base, convert with options, check with repair).
import { call, enc, download } from './api.js';
import { el, clear, fmtBytes, fmtTime, toast, modal, confirmDialog, field, parseSize } from './util.js';
import { imageState, formatSummary, backingName } from './catalog.js';
import { resultView } from './jobs.js';

const COLORS = { data: '#1d4f91', backing: '#d9822b', zero: '#8fd3ff', hole: '#e4e7eb', dirty: '#c0392b', clean: '#e4e7eb' };

// Wait for job id to conclude: its events update store.jobs; a poll each 2 s
// covers a stream that is down. Resolves with the job.
function waitJob(store, id) {
  return new Promise((resolve) => {
    let done = false;
    const finish = (j) => { if (!done) { done = true; unwatch(); clearInterval(poll); resolve(j); } };
    const check = () => { const j = store.jobs.get(id); if (j && j.status === 'concluded') finish(j); };
    const unwatch = store.watch((kind, key) => { if (kind === 'jobs' || key === id) check(); });
    const poll = setInterval(async () => {
      try { const j = await call('GET', '/v1/jobs/' + enc(id)); store.setJob(j); check(); } catch (e) { if (e.status === 404) finish(null); }
    }, 2000);
    check();
  });
}

// Start a job (POST path with body); toast its end; resolves with the finished job.
async function runJob(store, what, path, body) {
  let j;
  try {
    j = await call('POST', path, body);
  } catch (e) { toast(`${what}: ${e.describe()}`, 'error'); return null; }
  store.setJob(j);
  toast(`${what}: job ${j.id} started`);
  const end = await waitJob(store, j.id);
  if (end && end.error) toast(`${what} (job ${j.id}): ${end.error}`, 'error');
  else if (end) toast(`${what}: job ${j.id} concluded`);
  return end;
}

// Draw runs [{start, length, ...}] over size bytes into canvas, a pixel per
// size/(w*h) bytes in rows; kind(run) names its color; where runs share a pixel
// the one first in order wins. Returns {kind: bytes}.
export function drawMap(canvas, size, runs, kind, order) {
  const w = canvas.width, h = canvas.height, n = w * h;
  const rank = new Uint8Array(n).fill(255);
  const totals = {};
  for (const r of runs) {
    const k = kind(r);
    totals[k] = (totals[k] || 0) + r.length;
    const ki = order.indexOf(k);
    const a = Math.floor((r.start / size) * n), b = Math.max(a + 1, Math.ceil(((r.start + r.length) / size) * n));
    for (let p = a; p < b && p < n; p++) if (ki < rank[p]) rank[p] = ki;
  }
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(w, h);
  const rgb = order.map((k) => { const c = COLORS[k]; return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)); });
  for (let p = 0; p < n; p++) {
    const c = rank[p] === 255 ? [255, 255, 255] : rgb[rank[p]];
    img.data.set([c[0], c[1], c[2], 255], p * 4);
  }
  ctx.putImageData(img, 0, 0);
  return totals;
}

function legend(order, totals, size, labels) {
  return el('ul.legend', order.map((k) => el('li', el('span.swatch', { style: `background:${COLORS[k]}` }),
    `${labels[k]}: ${fmtBytes(totals[k] || 0)} (${size ? (100 * (totals[k] || 0) / size).toFixed(1) : 0}%)`)));
}

async function allocationMap(box, name, size) {
  const canvas = el('canvas.map', { width: 1024, height: 48, role: 'img', 'aria-label': 'Allocation map of ' + name });
  clear(box, el('h2', 'Allocation map'), canvas, el('p.muted', 'Loading extents…'));
  try {
    // context=allocation marks the runs from a backing layer; an older qcowd answers
    // 400 to it, and the map then has no 'from backing'
    let runs;
    try {
      runs = await call('GET', `/v1/images/${enc(name)}/extents?context=allocation`);
    } catch (e) {
      if (e.status !== 400) throw e;
      runs = await call('GET', `/v1/images/${enc(name)}/extents`);
    }
    const kind = (r) => (r.hole ? 'hole' : r.backing ? 'backing' : r.zero ? 'zero' : 'data');
    const order = ['data', 'backing', 'zero', 'hole'];
    const totals = drawMap(canvas, size, runs, kind, order);
    box.lastChild.replaceWith(legend(order, totals, size, { data: 'data in this image', backing: 'from the backing chain', zero: 'reads as zero (zero clusters)', hole: 'unallocated in the whole chain' }));
    canvas.dataset.runs = runs.length;
  } catch (e) { box.lastChild.replaceWith(el('p.error', e.describe())); }
}

async function dirtyMap(box, name, bitmap, size) {
  const canvas = el('canvas.map', { width: 1024, height: 24, role: 'img', 'aria-label': `Dirty map of bitmap ${bitmap}` });
  clear(box, el('h3', `Dirty map of ${bitmap}`), canvas, el('p.muted', 'Loading…'));
  try {
    const runs = await call('GET', `/v1/images/${enc(name)}/extents?context=dirty&bitmap=${enc(bitmap)}`);
    const order = ['dirty', 'clean'];
    const totals = drawMap(canvas, size, runs, (r) => (r.dirty ? 'dirty' : 'clean'), order);
    box.lastChild.replaceWith(legend(order, totals, size, { dirty: 'dirty', clean: 'clean' }));
  } catch (e) { box.lastChild.replaceWith(el('p.error', e.describe())); }
}

function chain(store, i) {
  const out = [];
  let cur = i, seen = new Set();
  while (cur && backingName(cur) && !seen.has(cur.name)) {
    seen.add(cur.name);
    const b = backingName(cur);
    out.push(b);
    cur = store.images.get(b);
  }
  return out;
}

function infoView(store, i) {
  const d = (i['format-specific'] && i['format-specific'].data) || {};
  const ch = chain(store, i);
  const users = [...store.images.values()].filter((x) => backingName(x) === i.name).map((x) => x.name);
  const row = (k, v) => [el('dt', k), el('dd', v)];
  return el('dl.info',
    row('Virtual size', `${fmtBytes(i['virtual-size'])} (${i['virtual-size']} bytes)`),
    row('Allocated', fmtBytes(i['actual-size'])),
    row('Format', formatSummary(i)),
    row('Compat', d.compat || '–'),
    row('Refcount bits', String(d['refcount-bits'] ?? '–')),
    row('Dirty flag', i['dirty-flag'] ? 'set (needs a check with repair)' : 'clear'),
    row('Corrupt bit', d.corrupt ? 'SET' : 'clear'),
    row('Backing chain', ch.length ? el('ol.chain', ch.map((b) => el('li', el('a', { href: '#/image/' + enc(b) }, b)))) : 'none (a base image)'),
    row('Base of', users.length ? users.map((u, k) => [k ? ', ' : '', el('a', { href: '#/image/' + enc(u) }, u)]) : 'no image'));
}

function snapshotsView(store, i, refresh) {
  const name = i.name;
  const snaps = i.snapshots || [];
  const op = store.can('operator');
  const sectionKids = [el('h2', `Snapshots (${snaps.length})`)];
  if (op) {
    const input = el('input', { name: 'snap', placeholder: 'new snapshot name', required: true, 'aria-label': 'New snapshot name', autocomplete: 'off' });
    sectionKids.push(el('form.inline', {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const s = input.value.trim();
        if (!s) return;
        input.value = '';
        await runJob(store, `snapshot ${s}`, `/v1/images/${enc(name)}/snapshots`, { name: s });
        refresh();
      },
    }, input, el('button.primary', { type: 'submit' }, 'Take snapshot')));
  }
  if (!snaps.length) sectionKids.push(el('p.muted', 'No snapshots.'));
  else {
    sectionKids.push(el('div.scroll', el('table.snapshots', el('thead', el('tr', ['ID', 'Name', 'Taken', 'VM state', ''].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', snaps.map((s) => el('tr', { dataset: { snap: s.name } },
        el('td', s.id), el('td', s.name), el('td', fmtTime(s['date-sec'] * 1000)), el('td', fmtBytes(s['vm-state-size'])),
        el('td.actions',
          op ? el('button.small', {
            type: 'button', 'aria-label': 'Revert to ' + s.name, onclick: async () => {
              if (!await confirmDialog(`Revert ${name} to ${s.name}?`, `The disk's current contents are replaced by the snapshot ${s.name}'s.`, 'Revert')) return;
              await runJob(store, `revert to ${s.name}`, `/v1/images/${enc(name)}/snapshots/${enc(s.name)}/revert`, {});
              refresh();
            },
          }, 'Revert') : null,
          el('button.small', {
            type: 'button', 'aria-label': 'Download ' + s.name, onclick: () => download(`/v1/images/${enc(name)}/snapshots/${enc(s.name)}/data`, `${name}-${s.name}.raw`).catch((e) => toast(e.describe(), 'error')),
          }, 'Download raw'),
          op ? el('button.small.danger', {
            type: 'button', 'aria-label': 'Delete snapshot ' + s.name, onclick: async () => {
              if (!await confirmDialog(`Delete snapshot ${s.name}?`, `The snapshot ${s.name} of ${name} is deleted for good.`)) return;
              try { await call('DELETE', `/v1/images/${enc(name)}/snapshots/${enc(s.name)}`).then((j) => j && j.id && (store.setJob(j), waitJob(store, j.id))); } catch (e) { toast(e.describe(), 'error'); }
              refresh();
            },
          }, 'Delete') : null)))))));
  }
  return el('section', { id: 'snapshots' }, sectionKids);
}

async function bitmapsView(box, store, i, refresh) {
  const name = i.name, op = store.can('operator');
  const map = el('div');
  let list;
  try {
    list = (await call('GET', `/v1/images/${enc(name)}/bitmaps`)).bitmaps;
  } catch (e) { clear(box, el('h2', 'Bitmaps'), el('p.error', e.describe())); return; }
  const post = async (b, what, body = {}) => {
    try {
      await call('POST', `/v1/images/${enc(name)}/bitmaps/${enc(b)}/${what}`, body);
      toast(`bitmap ${b}: ${what} done`);
    } catch (e) { toast(`bitmap ${b}: ${e.describe()}`, 'error'); }
    refresh();
  };
  const merge = async (b) => {
    const src = el('input', { name: 'source', required: true, autocomplete: 'off' });
    const img = el('input', { name: 'image', placeholder: name, autocomplete: 'off' });
    const v = await modal(`Merge into ${b}`, el('div.form', field('Source bitmap', src), field('Source image', img, 'empty: this image')),
      [{ label: 'Cancel', value: null }, { label: 'Merge', value: 'merge', primary: true }]);
    if (v !== 'merge') return;
    const body = { source: src.value.trim() };
    if (img.value.trim()) body['source-image'] = img.value.trim();
    post(b, 'merge', body);
  };
  const kids = [el('h2', `Bitmaps (${list.length})`)];
  if (op) {
    const bn = el('input', { name: 'bitmap', placeholder: 'new bitmap name', required: true, 'aria-label': 'New bitmap name', autocomplete: 'off' });
    const gran = el('input', { name: 'granularity', placeholder: 'granularity (64K)', 'aria-label': 'Granularity', autocomplete: 'off', size: 12 });
    const dis = el('input', { type: 'checkbox', name: 'disabled' });
    kids.push(el('form.inline', {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const body = { name: bn.value.trim() };
        if (gran.value.trim()) body.granularity = parseSize(gran.value);
        if (dis.checked) body.disabled = true;
        try { await call('POST', `/v1/images/${enc(name)}/bitmaps`, body); toast(`bitmap ${body.name} added`); } catch (e) { toast(e.describe(), 'error'); }
        refresh();
      },
    }, bn, gran, el('label.check', dis, ' disabled'), el('button.primary', { type: 'submit' }, 'Add bitmap')));
  }
  if (list.length) {
    kids.push(el('div.scroll', el('table.bitmaps', el('thead', el('tr', ['Name', 'Granularity', 'Flags', ''].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', list.map((b) => {
        const enabled = (b.flags || []).includes('auto');
        return el('tr', { dataset: { bitmap: b.name } }, el('td', b.name), el('td', fmtBytes(b.granularity)), el('td', (b.flags || []).join(', ') || 'disabled'),
          el('td.actions',
            el('button.small', { type: 'button', 'aria-label': `Dirty map of ${b.name}`, onclick: () => dirtyMap(map, name, b.name, i['virtual-size']) }, 'Dirty map'),
            op ? [
              el('button.small', { type: 'button', 'aria-label': `Clear ${b.name}`, onclick: () => post(b.name, 'clear') }, 'Clear'),
              el('button.small', { type: 'button', 'aria-label': `${enabled ? 'Disable' : 'Enable'} ${b.name}`, onclick: () => post(b.name, enabled ? 'disable' : 'enable') }, enabled ? 'Disable' : 'Enable'),
              el('button.small', { type: 'button', 'aria-label': `Merge into ${b.name}`, onclick: () => merge(b.name) }, 'Merge…'),
              el('button.small.danger', {
                type: 'button', 'aria-label': `Delete bitmap ${b.name}`, onclick: async () => {
                  if (!await confirmDialog(`Delete bitmap ${b.name}?`, 'Its dirty bits are lost.')) return;
                  try { await call('DELETE', `/v1/images/${enc(name)}/bitmaps/${enc(b.name)}`); } catch (e) { toast(e.describe(), 'error'); }
                  refresh();
                },
              }, 'Delete')] : null));
      })))));
  } else kids.push(el('p.muted', 'No bitmaps.'));
  kids.push(map);
  clear(box, kids);
}

async function commitDialog(store, i) {
  const ch = chain(store, i);
  if (!ch.length) { toast(`${i.name} has no backing file to commit into`, 'error'); return; }
  const base = el('select', { name: 'base' }, ch.map((b, k) => el('option', { value: b }, k ? b : `${b} (its backing file)`)));
  const v = await modal(`Commit ${i.name}`, el('div.form', el('p', `Writes ${i.name}'s data down into the base chosen. While it runs, the images of the chain answer 409.`), field('Base', base)),
    [{ label: 'Cancel', value: null }, { label: 'Start commit', value: 'go', primary: true }]);
  if (v === 'go') runJob(store, `commit of ${i.name}`, `/v1/images/${enc(i.name)}/commit`, base.selectedIndex ? { base: base.value } : {});
}

async function convertDialog(store, i) {
  const f = {
    target: el('input', { name: 'target', required: true, value: i.name + '-copy', autocomplete: 'off' }),
    snapshot: el('select', { name: 'snapshot' }, el('option', { value: '' }, '(the active disk)'), (i.snapshots || []).map((s) => el('option', { value: s.name }, s.name))),
    backing: el('select', { name: 'backing' }, el('option', { value: 'flatten' }, 'flatten the chain'), el('option', { value: 'keep' }, 'keep the backing file')),
    compress: el('input', { type: 'checkbox', name: 'compress' }),
    ctype: el('select', { name: 'ctype' }, ['', 'zlib', 'zstd'].map((v) => el('option', { value: v }, v || 'default'))),
    cluster: el('select', { name: 'cluster' }, ['', '4096', '65536', '262144', '1048576', '2097152'].map((v) => el('option', { value: v }, v ? fmtBytes(+v) : "the source's"))),
    refcount: el('select', { name: 'refcount' }, ['', '1', '8', '16', '32', '64'].map((v) => el('option', { value: v }, v || 'default (16)'))),
    l2: el('select', { name: 'l2' }, el('option', { value: '' }, "the source's"), el('option', { value: 'y' }, 'on'), el('option', { value: 'n' }, 'off')),
  };
  const v = await modal(`Convert ${i.name}`, el('div.form',
    field('New image name', f.target), field('Copy', f.snapshot), field('Backing', f.backing),
    el('label.check', f.compress, ' Compress clusters'), field('Compression type', f.ctype), field('Cluster size', f.cluster),
    field('Refcount bits', f.refcount), field('Extended L2', f.l2)),
  [{ label: 'Cancel', value: null }, { label: 'Start convert', value: 'go', primary: true }]);
  if (v !== 'go') return;
  const body = { target: f.target.value.trim(), backing: f.backing.value };
  if (f.snapshot.value) body.snapshot = f.snapshot.value;
  if (f.compress.checked) body.compress = true;
  if (f.ctype.value) body['compression-type'] = f.ctype.value;
  if (f.cluster.value) body['cluster-size'] = +f.cluster.value;
  if (f.refcount.value) body['refcount-bits'] = +f.refcount.value;
  if (f.l2.value) body['extended-l2'] = f.l2.value === 'y';
  runJob(store, `convert of ${i.name}`, `/v1/images/${enc(i.name)}/convert`, body);
}

async function checkDialog(store, i, box) {
  const repair = el('select', { name: 'repair' }, el('option', { value: '' }, 'no repair (read only)'), el('option', { value: 'leaks' }, 'repair leaks'), el('option', { value: 'all' }, 'repair all'));
  const v = await modal(`Check ${i.name}`, el('div.form', field('Repair', repair)), [{ label: 'Cancel', value: null }, { label: 'Start check', value: 'go', primary: true }]);
  if (v !== 'go') return;
  const j = await runJob(store, `check of ${i.name}`, `/v1/images/${enc(i.name)}/check`, repair.value ? { repair: repair.value } : {});
  if (j) clear(box, j.error ? el('pre.error', j.error) : resultView(j));
}

export function render(main, store, name) {
  const head = el('div.titlebar');
  const body = el('div.image');
  const mapBox = el('section', { id: 'map' });
  const bitBox = el('section', { id: 'bitmaps' });
  const checkBox = el('div');
  const jobsBox = el('section', { id: 'image-jobs' });
  clear(main, el('p', el('a', { href: '#/' }, '← Catalog')), head, body);
  let info = null, alive = true;
  const drawJobs = () => {
    const js = [...store.jobs.values()].filter((j) => j.image === name).sort((a, b) => b.id - a.id).slice(0, 5);
    clear(jobsBox, js.length ? [el('h2', 'Recent jobs'), el('ul.joblist', js.map((j) => el('li', { dataset: { id: j.id } },
      el('a', { href: '#/jobs' }, `#${j.id} ${j.type}`), ` ${j.status}${j.error ? ': ' + j.error : ''} `,
      el('progress', { max: j['total-progress'] || 1, value: j.status === 'concluded' && !j.error ? (j['total-progress'] || 1) : j['current-progress'] }))))] : null);
  };
  const load = async () => {
    try {
      info = Object.assign({ name }, await call('GET', '/v1/images/' + enc(name)));
    } catch (e) {
      if (!alive) return;
      clear(head, el('h1', name), e.status === 404 ? el('span.badge.bad', 'not found') : el('span.badge.bad', e.code));
      clear(body, el('p.error', { role: 'alert' }, e.describe()),
        e.status !== 404 && store.can('operator') ? el('p', 'A corrupt image may be repaired by a check with repair "all", or downloaded as it is.') : null,
        e.status !== 404 ? el('div.buttons',
          store.can('operator') ? el('button', { type: 'button', onclick: () => checkDialog(store, { name }, checkBox) }, 'Check…') : null,
          el('button', { type: 'button', onclick: () => download(`/v1/images/${enc(name)}/file`, name + '.qcow2').catch((x) => toast(x.describe(), 'error')) }, 'Download qcow2')) : null,
        checkBox, jobsBox);
      drawJobs();
      document.body.dataset.ready = 'image';
      return;
    }
    if (!alive) return;
    store.images.set(name, info);
    const st = imageState(store, info);
    clear(head, el('h1', name), el('span.badge.' + st.cls, { title: st.title }, st.text),
      el('div.buttons',
        store.can('operator') && backingName(info) ? el('button', { type: 'button', onclick: () => commitDialog(store, info) }, 'Commit…') : null,
        store.can('admin') ? el('button', { type: 'button', onclick: () => convertDialog(store, info) }, 'Convert…') : null,
        store.can('operator') ? el('button', { type: 'button', onclick: () => checkDialog(store, info, checkBox) }, 'Check…') : null,
        el('button', { type: 'button', onclick: () => download(`/v1/images/${enc(name)}/file`, name + '.qcow2').catch((e) => toast(e.describe(), 'error')) }, 'Download qcow2')));
    clear(body, checkBox, el('section', el('h2', 'Details'), infoView(store, info)), mapBox,
      snapshotsView(store, info, load), bitBox, jobsBox);
    drawJobs();
    await Promise.all([allocationMap(mapBox, name, info['virtual-size']), bitmapsView(bitBox, store, info, load)]);
    document.body.dataset.ready = 'image';
  };
  const unwatch = store.watch((kind, key) => {
    if (kind === 'job' || kind === 'jobs') drawJobs();
  });
  load();
  return { destroy() { alive = false; unwatch(); delete document.body.dataset.ready; } };
}

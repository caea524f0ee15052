// dashboard.mjs: the web dashboard in Debian's Chromium (driven by playwright-core)
// against a live qcowd that this script starts: create, upload, snapshots, bitmaps,
// a commit followed live over the event stream (and a reconnect), a convert paused,
// resumed and cancelled, a corrupt image, a token login with role-limited actions,
// and 2,000 images with 500 jobs with their times to first paint and to interactive.
// Screenshots go to $ARTIFACTS. Prints `ok NAME` / `FAIL NAME: why` and
// `N passed, M failed`; `node dashboard.mjs WORD` runs the cases named with WORD.
import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const QCOWD = process.env.QCOWD;
const QEMU_IMG = process.env.QEMU_IMG || 'qemu-img';
const QEMU_IO = process.env.QEMU_IO || 'qemu-io';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.ARTIFACTS || path.join(os.tmpdir(), 'qcowd-web-artifacts');
const ONLY = process.argv[2] || ''; // run the cases whose name contains this
const MiB = 1 << 20;

function skipOrFail(why) {
  // CI installs everything (scripts/install-deps.sh --test): there a missing tool is a failure
  console.log((process.env.CI ? 'FAIL setup: ' : 'skip: ') + why);
  process.exit(process.env.CI ? 1 : 77);
}
if (!QCOWD) skipOrFail('QCOWD is not set');
if (!fs.existsSync(CHROMIUM)) skipOrFail(`no ${CHROMIUM} (apt-get install chromium)`);
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  skipOrFail('no playwright-core: run scripts/install-deps.sh --test (npm ci in tests/web): ' + e.message);
}

const top = fs.mkdtempSync(path.join(os.tmpdir(), 'qcowd-web-'));
fs.mkdirSync(ARTIFACTS, { recursive: true });
const run = (cmd, ...args) => execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- a live qcowd ----

const daemons = [];
function startQcowd(catalog, extra = []) {
  return new Promise((resolve, reject) => {
    const proc = spawn(QCOWD, ['--listen', '127.0.0.1:0', '--catalog', catalog, '--quiet', ...extra],
      { stdio: ['ignore', 'ignore', 'pipe'] });
    const d = { proc, lines: [], url: null };
    daemons.push(d);
    let buf = '';
    const timer = setTimeout(() => reject(new Error('qcowd did not start:\n' + d.lines.join('\n'))), 60000);
    proc.stderr.on('data', (chunk) => {
      buf += chunk.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        d.lines.push(line);
        const m = /listening on (http:\/\/127\.0\.0\.1:\d+)\//.exec(line);
        if (m && !d.url) { d.url = m[1]; clearTimeout(timer); resolve(d); }
      }
    });
    proc.on('exit', (code) => { d.exit = code; if (!d.url) { clearTimeout(timer); reject(new Error(`qcowd exited ${code}:\n` + d.lines.join('\n'))); } });
  });
}

async function stopQcowd(d) {
  if (d.exit !== undefined) return;
  const done = new Promise((r) => d.proc.on('exit', r));
  d.proc.kill('SIGTERM');
  await Promise.race([done, sleep(20000)]);
  if (d.exit === undefined) d.proc.kill('SIGKILL');
}

// One API call from the test itself: [status, parsed body or text].
async function api(d, method, p, body, token) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = 'Bearer ' + token;
  const r = await fetch(d.url + p, { method, headers, body: body === undefined ? undefined : (body instanceof Uint8Array ? body : JSON.stringify(body)) });
  const text = await r.text();
  let v = text;
  try { v = JSON.parse(text); } catch { /* not JSON */ }
  return [r.status, v];
}

async function waitFor(what, fn, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await sleep(50);
  }
}

function qcow2(file, size, ...io) {
  run(QEMU_IMG, 'create', '-q', '-f', 'qcow2', file, size);
  if (io.length) run(QEMU_IO, '-f', 'qcow2', ...io.flatMap((c) => ['-c', c]), file);
}

// ---- the cases ----

const results = [];
let browser, page, d;

async function open(hash, ready) {
  await page.goto(d.url + '/' + hash);
  await page.waitForSelector(`body[data-ready="${ready}"]`, { timeout: 30000 });
}

async function shot(name) {
  await page.screenshot({ path: path.join(ARTIFACTS, name + '.png'), fullPage: false });
}

async function case_(name, fn) {
  if (ONLY && !name.includes(ONLY)) return;
  const t0 = Date.now();
  try {
    await fn();
    results.push([name, true]);
    console.log(`ok ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push([name, false]);
    console.log(`FAIL ${name}: ${e.stack || e}`);
    if (page) await page.screenshot({ path: path.join(ARTIFACTS, 'fail-' + name + '.png') }).catch(() => {});
  }
}

async function main() {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  const cat = path.join(top, 'cat');
  fs.mkdirSync(cat);
  qcow2(path.join(cat, 'base.qcow2'), '64M', 'write -q -P 0x11 0 8M');
  qcow2(path.join(cat, 'top.qcow2'), '64M');
  run(QEMU_IMG, 'rebase', '-u', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(cat, 'top.qcow2'));
  run(QEMU_IO, '-f', 'qcow2', '-c', 'write -q -P 0x22 16M 24M', path.join(cat, 'top.qcow2'));
  fs.writeFileSync(path.join(cat, 'broken.qcow2'), Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(60)]));
  d = await startQcowd(cat);
  const errors = [];
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  page = await ctx.newPage();
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });

  await case_('event_stream_parser_and_reconnect', async () => {
    // the page's EventStream (clients/web/api.js) in node against a hand-written
    // SSE server: CRLF and LF lines, comments, multi-line data, retry, an 'event:
    // lost', a cut connection, then the reconnection with Last-Event-ID
    const http = await import('node:http');
    globalThis.sessionStorage = { getItem: () => 'tok-1', setItem() {}, removeItem() {} };
    const { EventStream } = await import(new URL('../../clients/web/api.js', import.meta.url));
    const seen = [];
    let conns = 0;
    const srv = http.createServer((req, res) => {
      conns++;
      seen.push(['headers', req.headers.authorization, req.headers['last-event-id'] || null]);
      res.writeHead(200, { 'Content-Type': 'text/event-stream' });
      if (conns === 1) {
        res.write('retry: 50\r\n: hello\r\n\r\n');
        res.write('event: job-status\r\nid: 7\r\ndata: {"id":"1",\r\ndata: "status":"running"}\r\n\r\n');
        res.write('event: lost\nid: 9\ndata: {"dropped":3}\n\n');
        res.end('event: job-status\nid: 10\ndata: {"id":"2"');  // cut mid-event: asked for again
      } else {
        res.end('event: job-status\nid: 10\ndata: {"id":"2"}\n\nevent: job-status\nid: 11\ndata: {"id":"3"}\n\n');
      }
    });
    await new Promise((r) => srv.listen(0, '127.0.0.1', r));
    const base = `http://127.0.0.1:${srv.address().port}`;
    const realFetch = globalThis.fetch;
    globalThis.fetch = (u, init) => realFetch(base + u, init);
    const es = new EventStream();
    let opens = 0;
    es.onopen = async () => { opens++; };
    es.on('job-status', (d, id) => seen.push(['job', d.id, d.status || null, id]));
    es.on('lost', (d) => seen.push(['lost', d.dropped]));
    const running = es.run();
    try {
      await waitFor('the second connection\'s event', async () => seen.some((x) => x[0] === 'job' && x[1] === '3'), 5000);
    } finally {
      es.stop();
      await running;
      globalThis.fetch = realFetch;
      srv.close();
    }
    const want = JSON.stringify([['headers', 'Bearer tok-1', null], ['job', '1', 'running', '7'], ['lost', 3],
      ['headers', 'Bearer tok-1', '9'], ['job', '2', null, '10'], ['job', '3', null, '11']]);
    if (JSON.stringify(seen) !== want || opens !== 2) throw new Error(`seen ${JSON.stringify(seen)}, ${opens} opens`);
  });

  await case_('served_with_strict_headers', async () => {
    const r = await fetch(d.url + '/');
    const csp = r.headers.get('content-security-policy') || '';
    if (r.status !== 200 || !/text\/html/.test(r.headers.get('content-type'))) throw new Error('GET / ' + r.status);
    if (!csp.includes("script-src 'self'") || csp.includes('unsafe-inline')) throw new Error('CSP: ' + csp);
    if (r.headers.get('x-content-type-options') !== 'nosniff') throw new Error('no nosniff');
    const js = await fetch(d.url + '/ui/app.js');
    if (!/^text\/javascript/.test(js.headers.get('content-type'))) throw new Error('app.js type ' + js.headers.get('content-type'));
    const again = await fetch(d.url + '/ui/app.js', { headers: { 'If-None-Match': js.headers.get('etag') } });
    if (again.status !== 304) throw new Error('revalidation gave ' + again.status);
    for (const p of ['/ui/nope.js', '/ui/%2e%2e%2fCMakeLists.txt', '/ui/..%2Fapi.js', '/ui/app.js/x', '/index.html']) {
      const x = await fetch(d.url + p);
      if (x.status !== 404 && x.status !== 400) throw new Error(`${p} gave ${x.status}`);
    }
    const [st, me] = await api(d, 'GET', '/v1/whoami');
    if (st !== 200 || me.role !== 'admin' || me.auth !== false) throw new Error('whoami ' + JSON.stringify(me));
  });

  await case_('create_an_image_and_see_it_listed', async () => {
    await open('', 'catalog');
    await page.getByRole('button', { name: 'Create image' }).click();
    await page.getByLabel('Name', { exact: true }).fill('web1');
    await page.getByLabel('Size', { exact: true }).fill('64M');
    await page.getByRole('button', { name: 'Create', exact: true }).click();
    await page.waitForSelector('tr[data-name="web1"]');
    const [st, info] = await api(d, 'GET', '/v1/images/web1');
    if (st !== 200 || info['virtual-size'] !== 64 * MiB) throw new Error('web1: ' + JSON.stringify(info));
    const row = await page.textContent('tr[data-name="web1"]');
    if (!row.includes('64.0 MiB')) throw new Error('row: ' + row);
    // the backing tree: top under base
    await page.getByLabel('Backing tree').check();
    await page.waitForSelector('td.name .branch');
    const names = await page.$$eval('tbody tr', (rs) => rs.map((r) => r.dataset.name));
    if (names.indexOf('top') !== names.indexOf('base') + 1) throw new Error('tree order ' + names);
    await shot('catalog');
    await page.getByLabel('Backing tree').uncheck();
    // an error as the API says it: the name is taken
    await page.getByRole('button', { name: 'Create image' }).click();
    await page.getByLabel('Name', { exact: true }).fill('web1');
    await page.getByLabel('Size', { exact: true }).fill('1M');
    await page.getByRole('button', { name: 'Create', exact: true }).click();
    await page.waitForSelector('dialog p.error:not([hidden])');
    const msg = await page.textContent('dialog p.error');
    if (!/^409 conflict: /.test(msg)) throw new Error('dialog says ' + msg);
    await page.keyboard.press('Escape');
    // delete, after a confirmation
    await api(d, 'POST', '/v1/images', { name: 'gone', size: MiB });
    await page.waitForSelector('tr[data-name="gone"]'); // from the image-created event
    await page.getByRole('button', { name: 'Delete gone' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Cancel' }).click();
    if ((await api(d, 'GET', '/v1/images/gone'))[0] !== 200) throw new Error('deleted without the confirmation');
    await page.getByRole('button', { name: 'Delete gone' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Delete', exact: true }).click();
    await page.waitForSelector('tr[data-name="gone"]', { state: 'detached' });
    if ((await api(d, 'GET', '/v1/images/gone'))[0] !== 404) throw new Error('gone is still there');
  });

  await case_('upload_a_qcow2_from_the_page', async () => {
    const file = path.join(top, 'upme.qcow2');
    qcow2(file, '32M', 'write -q -P 0x5a 1M 3M');
    await open('', 'catalog');
    // the first try's connection breaks after half of the file reached qcowd: the
    // page asks how much qcowd kept ("bytes */SIZE") and sends the rest from there
    const blob = fs.readFileSync(file);
    const half = Math.floor(blob.length / 2);
    let tries = 0;
    const ranges = [];
    await page.route('**/v1/images/upme/file', async (route) => {
      const req = route.request();
      ranges.push(req.headers()['content-range'] || '');
      if (++tries === 1) {
        const headers = { ...req.headers(), 'content-range': `bytes 0-${half - 1}/${blob.length}` };
        delete headers['content-length'];
        await route.fetch({ postData: blob.subarray(0, half), headers });
        return route.abort('connectionreset');
      }
      return route.continue();
    });
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await page.getByLabel('File').setInputFiles(file);
    if (await page.getByLabel('Image name').inputValue() !== 'upme') throw new Error('name not taken from the file');
    await page.locator('dialog').getByRole('button', { name: 'Upload', exact: true }).click();
    await page.waitForSelector('.upload[data-name="upme"][data-state="retrying"]');
    await page.waitForSelector('.upload[data-name="upme"][data-state="done"]');
    await page.unroute('**/v1/images/upme/file');
    const want = [`bytes 0-${blob.length - 1}/${blob.length}`, `bytes */${blob.length}`,
      `bytes ${half}-${blob.length - 1}/${blob.length}`];
    if (JSON.stringify(ranges) !== JSON.stringify(want)) throw new Error('upload requests: ' + JSON.stringify(ranges));
    const resumed = await page.getAttribute('.upload[data-name="upme"]', 'data-resumed-at');
    if (Number(resumed) !== half) throw new Error('resumed at ' + resumed + ', not ' + half);
    const pct = await page.textContent('.upload[data-name="upme"] .pct');
    if (pct !== '100%') throw new Error('progress ' + pct);
    await page.waitForSelector('tr[data-name="upme"]');
    const [st, info] = await api(d, 'GET', '/v1/images/upme');
    if (st !== 200 || info['virtual-size'] !== 32 * MiB) throw new Error('upme: ' + JSON.stringify(info));
    // a refused upload shows the API's error (422: a qcow2 magic, then garbage)
    const junk = path.join(top, 'junk.qcow2');
    fs.writeFileSync(junk, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), randomBytes(70000)]));
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await page.getByLabel('File').setInputFiles(junk);
    await page.locator('dialog').getByRole('button', { name: 'Upload', exact: true }).click();
    await page.waitForSelector('.upload[data-name="junk"][data-state="failed"]');
    const err = await page.textContent('.upload[data-name="junk"] p.error');
    if (!/^422 /.test(err)) throw new Error('junk upload says ' + err);
  });

  await case_('raw_upload_resumes_after_a_broken_connection', async () => {
    // 10 MiB: data, 4 MiB of zeroes (never sent), data; the range at 8 MiB breaks once
    const raw = path.join(top, 'disk.img');
    const bytes = Buffer.concat([randomBytes(4 * MiB), Buffer.alloc(4 * MiB), randomBytes(2 * MiB)]);
    fs.writeFileSync(raw, bytes);
    await open('', 'catalog');
    const puts = [];
    await page.route('**/v1/images/disk/data?flush=n', (route) => {
      const range = route.request().headers()['content-range'];
      puts.push(range);
      return range.startsWith(`bytes ${8 * MiB}-`) && puts.filter((x) => x === range).length === 1 ? route.abort('connectionreset') : route.continue();
    });
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await page.getByLabel('File').setInputFiles(raw);
    await page.locator('dialog').getByRole('button', { name: 'Upload', exact: true }).click();
    await page.waitForSelector('.upload[data-name="disk"][data-state="retrying"]');
    const badge = await page.textContent('.upload[data-name="disk"] .badge');
    if (!badge.includes('resuming at 8.00 MiB')) throw new Error('badge: ' + badge);
    await page.waitForSelector('.upload[data-name="disk"][data-state="done"]');
    await page.unroute('**/v1/images/disk/data?flush=n');
    const want = [`bytes 0-${4 * MiB - 1}/*`, `bytes ${8 * MiB}-${10 * MiB - 1}/*`, `bytes ${8 * MiB}-${10 * MiB - 1}/*`];
    if (JSON.stringify(puts) !== JSON.stringify(want)) throw new Error('ranges sent: ' + puts);
    const back = Buffer.from(await (await fetch(d.url + '/v1/images/disk/data')).arrayBuffer());
    if (!back.equals(bytes)) throw new Error('the image does not read back as the file');
  });

  await case_('take_and_revert_a_snapshot', async () => {
    await open('#/image/web1', 'image');
    await page.getByLabel('New snapshot name').fill('before');
    await page.getByRole('button', { name: 'Take snapshot' }).click();
    await page.waitForSelector('tr[data-snap="before"]');
    // change the disk behind the page's back, then revert from the page
    const data = new Uint8Array(65536).fill(0xab);
    const r = await fetch(d.url + '/v1/images/web1/data', { method: 'PUT', headers: { 'Content-Range': 'bytes 0-65535/*', 'Content-Type': 'application/octet-stream' }, body: data });
    if (r.status >= 300) throw new Error('PUT data ' + r.status + ' ' + await r.text());
    const read = async () => new Uint8Array(await (await fetch(d.url + '/v1/images/web1/data', { headers: { Range: 'bytes=0-15' } })).arrayBuffer());
    if ((await read())[0] !== 0xab) throw new Error('the write did not land');
    await page.getByRole('button', { name: 'Revert to before' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Revert', exact: true }).click();
    await waitFor('the revert', async () => (await read())[0] === 0);
    await page.waitForSelector('.toast >> text=/revert to before: job \\d+ concluded/');
    await page.waitForSelector('canvas.map[data-runs]');
    await shot('image');
    // the snapshot's data as a download
    const [dl] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download before' }).click()]);
    const saved = path.join(top, 'before.raw');
    await dl.saveAs(saved);
    if (dl.suggestedFilename() !== 'web1-before.raw' || fs.statSync(saved).size !== 64 * MiB) throw new Error('download ' + dl.suggestedFilename() + ' ' + fs.statSync(saved).size);
    fs.unlinkSync(saved);
    // a second snapshot, deleted from the page
    await page.getByLabel('New snapshot name').fill('scratch');
    await page.getByRole('button', { name: 'Take snapshot' }).click();
    await page.waitForSelector('tr[data-snap="scratch"]');
    await page.getByRole('button', { name: 'Delete snapshot scratch' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Delete', exact: true }).click();
    await page.waitForSelector('tr[data-snap="scratch"]', { state: 'detached' });
    const [, snaps] = await api(d, 'GET', '/v1/images/web1/snapshots');
    if (snaps.snapshots.map((x) => x.name).join() !== 'before') throw new Error('snapshots ' + JSON.stringify(snaps));
  });

  await case_('bitmaps_and_a_check_with_repair', async () => {
    await open('#/image/web1', 'image');
    await page.getByLabel('New bitmap name').fill('b1');
    await page.getByRole('button', { name: 'Add bitmap' }).click();
    await page.waitForSelector('tr[data-bitmap="b1"]');
    const r = await fetch(d.url + '/v1/images/web1/data', { method: 'PUT', headers: { 'Content-Range': `bytes ${MiB}-${MiB + 65535}/*`, 'Content-Type': 'application/octet-stream' }, body: new Uint8Array(65536).fill(7) });
    if (r.status >= 300) throw new Error('PUT ' + r.status);
    const dirty = async () => {
      await page.locator('tr[data-bitmap="b1"]').getByRole('button', { name: 'Dirty map of b1' }).click();
      await page.waitForSelector('#bitmaps ul.legend');
      return page.textContent('#bitmaps ul.legend li:first-child');
    };
    if (!(await dirty()).startsWith('dirty: 64.0 KiB')) throw new Error('dirty map: ' + await page.textContent('#bitmaps ul.legend'));
    await page.locator('tr[data-bitmap="b1"]').getByRole('button', { name: 'Clear b1' }).click();
    await page.waitForSelector('.toast >> text=bitmap b1: clear done');
    if (!(await dirty()).startsWith('dirty: 0 B')) throw new Error('after clear: ' + await page.textContent('#bitmaps ul.legend'));
    await page.locator('tr[data-bitmap="b1"]').getByRole('button', { name: 'Disable b1' }).click();
    await page.locator('tr[data-bitmap="b1"]').getByRole('button', { name: 'Enable b1' }).waitFor();
    const [, b] = await api(d, 'GET', '/v1/images/web1/bitmaps/b1');
    if ((b.flags || []).includes('auto')) throw new Error('still enabled: ' + JSON.stringify(b));
    // merge b2 (dirty 64 KiB) into b1, then delete b2
    await page.getByLabel('New bitmap name').fill('b2');
    await page.getByRole('button', { name: 'Add bitmap' }).click();
    await page.waitForSelector('tr[data-bitmap="b2"]');
    const w = await fetch(d.url + '/v1/images/web1/data', { method: 'PUT', headers: { 'Content-Range': `bytes ${2 * MiB}-${2 * MiB + 65535}/*`, 'Content-Type': 'application/octet-stream' }, body: new Uint8Array(65536).fill(9) });
    if (w.status >= 300) throw new Error('PUT ' + w.status);
    await page.locator('tr[data-bitmap="b1"]').getByRole('button', { name: 'Merge into b1' }).click();
    await page.getByLabel('Source bitmap').fill('b2');
    await page.getByRole('button', { name: 'Merge', exact: true }).click();
    await page.waitForSelector('.toast >> text=bitmap b1: merge done');
    if (!(await dirty()).startsWith('dirty: 64.0 KiB')) throw new Error('after merge: ' + await page.textContent('#bitmaps ul.legend'));
    await page.getByRole('button', { name: 'Delete bitmap b2' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Delete', exact: true }).click();
    await page.waitForSelector('tr[data-bitmap="b2"]', { state: 'detached' });
    await page.getByRole('button', { name: 'Check…' }).click();
    await page.getByLabel('Repair').selectOption('all');
    await page.getByRole('button', { name: 'Start check' }).click();
    await page.waitForSelector('.report >> text=No errors were found on the image.');
  });

  await case_('commit_followed_live_over_the_event_stream', async () => {
    await open('#/image/top', 'image');
    // the allocation map tells this image's data from its base's
    const legend = await page.textContent('#map ul.legend');
    if (!legend.includes('data in this image: 24.0 MiB') || !legend.includes('from the backing chain: 8.00 MiB')) throw new Error('legend: ' + legend);
    await page.getByRole('button', { name: 'Commit…' }).click();
    await page.getByRole('button', { name: 'Start commit' }).click();
    await page.waitForSelector('.toast >> text=/commit of top: job \\d+ started/');
    await page.getByRole('link', { name: 'Jobs', exact: true }).click();
    await page.waitForSelector('body[data-ready="jobs"]');
    await page.waitForSelector('article.job:has-text("commit") .badge[data-status="concluded"]', { timeout: 60000 });
    // a job started elsewhere appears and concludes through the events alone
    // (this page never polls), also after the stream was cut and resumed
    const lastIds = [];
    page.on('request', (q) => { if (q.url().endsWith('/v1/events') && q.headers()['last-event-id']) lastIds.push(q.headers()['last-event-id']); });
    await page.evaluate(() => window.qcowdDropEvents());
    await page.waitForSelector('#live[data-state="retrying"], #live[data-state="connecting"]', { timeout: 5000 }).catch(() => {});
    const [st, j] = await api(d, 'POST', '/v1/images/base/check', {});
    if (st !== 202) throw new Error('check: ' + st + JSON.stringify(j));
    await page.waitForSelector(`article.job[data-id="${j.id}"] .badge[data-status="concluded"]`, { timeout: 30000 });
    await page.waitForSelector('#live[data-state="live"]');
    if (!lastIds.length || !/^\d+$/.test(lastIds[0])) throw new Error('the reconnection sent no Last-Event-ID');
    const report = await page.textContent(`[data-report="${j.id}"]`);
    if (!report.includes('No errors were found')) throw new Error('report: ' + report);
    await shot('jobs');
  });

  await case_('cancel_a_long_convert', async () => {
    // 128 MiB of half-random clusters, compressed with zlib: seconds of work
    const raw = path.join(top, 'long.raw');
    const blob = randomBytes(4 * MiB);
    const fd = fs.openSync(raw, 'w');
    for (let c = 0; c < 2048; c++) {
      const k = (c * 977 * 1024) % (4 * MiB - 32 * 1024);
      fs.writeSync(fd, blob.subarray(k, k + 24 * 1024));
      fs.writeSync(fd, Buffer.alloc(40 * 1024));
    }
    fs.closeSync(fd);
    run(QEMU_IMG, 'convert', '-f', 'raw', '-O', 'qcow2', raw, path.join(cat, 'long.qcow2'));
    fs.unlinkSync(raw);
    await open('#/image/long', 'image');
    await page.getByRole('button', { name: 'Convert…' }).click();
    await page.getByLabel('New image name').fill('long2');
    await page.getByLabel('Compress clusters').check();
    await page.getByLabel('New image name').press('Enter'); // Enter starts it, as the button does
    await page.waitForSelector('.toast >> text=/convert of long: job \\d+ started/');
    await page.getByRole('link', { name: 'Jobs', exact: true }).click();
    const card = page.locator('article.job', { hasText: 'convert' }).filter({ hasText: 'long2' });
    await card.locator('.badge[data-status="running"]').waitFor();
    await card.getByRole('button', { name: /^Pause job/ }).click();
    await card.locator('.badge[data-status="paused"]').waitFor();
    // the paused convert holds its image: busy in the catalog, and a delete is a 409 naming the job
    const jobId = await card.getAttribute('data-id');
    await page.getByRole('link', { name: 'Catalog', exact: true }).click();
    await page.waitForSelector('tr[data-name="long"] .badge.busy');
    await page.getByRole('button', { name: 'Delete long' }).click();
    await page.locator('dialog').getByRole('button', { name: 'Delete', exact: true }).click();
    const t409 = await page.locator('.toast.error', { hasText: 'long' }).last().textContent();
    if (!t409.startsWith('409 conflict: ') || !t409.includes('job ' + jobId)) throw new Error('delete of a busy image says: ' + t409);
    await page.locator('.toast.error button').last().click();
    await page.getByRole('link', { name: 'Jobs', exact: true }).click();
    await card.getByRole('button', { name: /^Resume job/ }).click();
    await card.locator('.badge[data-status="running"]').waitFor();
    await card.getByRole('button', { name: /^Cancel job/ }).click();
    await card.locator('.badge[data-status="concluded"]').waitFor({ timeout: 30000 });
    const text = await card.textContent();
    console.log('    cancelled at ' + await card.locator('.progress small').textContent());
    if (!text.includes('cancelled') || !/cancel/i.test(await card.locator('pre.error').textContent())) throw new Error('card: ' + text);
    const [st] = await api(d, 'GET', '/v1/images/long2');
    if (st !== 404) throw new Error('long2 is there: ' + st);
    await card.getByRole('button', { name: /^Dismiss job/ }).click();
    await card.waitFor({ state: 'detached' });
  });

  await case_('a_corrupt_images_error', async () => {
    await open('', 'catalog');
    const badge = await page.textContent('tr[data-name="broken"] .badge');
    if (badge !== 'corrupt-image') throw new Error('badge ' + badge);
    const [, info] = await api(d, 'GET', '/v1/images/broken');
    await open('#/image/broken', 'image');
    const msg = await page.textContent('main p.error');
    if (msg !== `422 corrupt-image: ${info.error.message}`) throw new Error(`page says "${msg}", the API "${info.error.message}"`);
  });

  await case_('phone_width', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await open('', 'catalog');
    const w = await page.evaluate(() => document.documentElement.scrollWidth);
    if (w > 390) throw new Error('the catalog is ' + w + ' px wide on a phone');
    await shot('catalog-phone');
    await open('#/jobs', 'jobs');
    await shot('jobs-phone');
    await page.setViewportSize({ width: 1280, height: 800 });
  });

  await case_('keyboard_reaches_the_actions', async () => {
    await open('', 'catalog');
    await page.locator('a.skip').focus();
    const seen = new Set();
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press('Tab');
      seen.add(await page.evaluate(() => document.activeElement.textContent.trim() || document.activeElement.getAttribute('aria-label')));
    }
    for (const want of ['Catalog', 'Jobs', 'Create image', 'Upload']) if (!seen.has(want)) throw new Error(`Tab never reached ${want}: ${[...seen]}`);
  });

  if (errors.length && (!ONLY)) console.log('  browser console errors: ' + errors.join(' | '));
  await ctx.close();
  await stopQcowd(d);

  // ---- tokens: login and role-limited actions ----
  await case_('login_with_a_token_and_role_limited_actions', async () => {
    const tokens = {};
    const lines = [];
    for (const [name, role] of [['viewer', 'reader'], ['ops', 'operator'], ['boss', 'admin']]) {
      const out = run(QCOWD, 'token', 'new', name, role).split('\n');
      tokens[name] = out[0].trim();
      lines.push(out[1].trim());
    }
    const file = path.join(top, 'tokens');
    fs.writeFileSync(file, lines.join('\n') + '\n', { mode: 0o600 });
    d = await startQcowd(cat, ['--tokens', file]);
    const c2 = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await c2.newPage();
    await page.goto(d.url + '/');
    await page.getByLabel('Token').fill('not-a-token');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForSelector('.login p.error:not([hidden])');
    if (!/^401 unauthorized/.test(await page.textContent('.login p.error'))) throw new Error('bad token: ' + await page.textContent('.login p.error'));
    await shot('login');
    await page.getByLabel('Token').fill(tokens.viewer);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForSelector('body[data-ready="catalog"]');
    if (await page.getByRole('button', { name: 'Create image' }).count()) throw new Error('a reader is offered Create');
    if (await page.locator('tr[data-name="base"] button').count()) throw new Error('a reader is offered Delete');
    if (!(await page.textContent('#who')).includes('viewer (reader)')) throw new Error('who: ' + await page.textContent('#who'));
    await page.waitForSelector('#live[data-state="live"]');
    // the token lives in sessionStorage only
    const stored = await page.evaluate(() => [sessionStorage.getItem('qcowd-token'), localStorage.length, document.cookie]);
    if (stored[0] !== tokens.viewer || stored[1] !== 0 || stored[2] !== '') throw new Error('storage ' + JSON.stringify(stored));
    await open('#/image/base', 'image');
    await page.waitForSelector('#snapshots');
    if (await page.getByRole('button', { name: 'Take snapshot' }).count()) throw new Error('a reader is offered snapshots');
    // an operator: snapshots and checks, but neither create, delete nor convert
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Token').fill(tokens.ops);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForSelector('body[data-ready="catalog"]');
    if (await page.getByRole('button', { name: 'Create image' }).count()) throw new Error('an operator is offered Create');
    await open('#/image/base', 'image');
    await page.getByRole('button', { name: 'Take snapshot' }).waitFor();
    await page.getByRole('button', { name: 'Check…' }).waitFor();
    if (await page.getByRole('button', { name: 'Convert…' }).count()) throw new Error('an operator is offered Convert');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Token').fill(tokens.boss);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForSelector('body[data-ready="catalog"]');
    await page.getByRole('button', { name: 'Create image' }).waitFor();
    await c2.close();
    await stopQcowd(d);
  });

  // ---- 2,000 images and 500 jobs ----
  await case_('2000_images_500_jobs_timings', async () => {
    const big = path.join(top, 'big');
    fs.mkdirSync(big);
    const one = path.join(top, 'one.qcow2');
    // 4 KiB clusters keep the 2,000 files small (about 20 KiB each)
    run(QEMU_IMG, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', one, '1G');
    run(QEMU_IO, '-f', 'qcow2', '-c', 'write -q -P 1 0 64k', one);
    const bytes = fs.readFileSync(one);
    // the jobs first, on 10 images (starting a job is slower in a big catalog),
    // then the other 1,990 files are dropped into the folder
    const file = (i) => path.join(big, `vm-${String(i).padStart(4, '0')}.qcow2`);
    for (let i = 0; i < 10; i++) fs.writeFileSync(file(i), bytes);
    d = await startQcowd(big, ['--max-queued-jobs', '1000']);
    let t = Date.now();
    for (let i = 0; i < 500; i += 50) {
      const batch = [];
      for (let k = i; k < i + 50; k++) batch.push(api(d, 'POST', `/v1/images/vm-${String(k % 10).padStart(4, '0')}/check`, {}));
      for (const [st, j] of await Promise.all(batch)) if (st !== 202) throw new Error('check ' + st + JSON.stringify(j));
    }
    for (let i = 10; i < 2000; i++) fs.writeFileSync(file(i), bytes);
    console.log(`    500 check jobs started and 2000 files of ${bytes.length} bytes written in ${Date.now() - t} ms`);
    // measured while the checks run: the pages stay responsive under a stream of events
    const c3 = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await c3.newPage();
    const timing = async (hash, ready) => {
      await page.goto('about:blank');
      const t0 = Date.now();
      await page.goto(d.url + '/' + hash);
      await page.waitForSelector(`body[data-ready="${ready}"]`, { timeout: 60000 });
      const wall = Date.now() - t0;
      const m = await page.evaluate(() => {
        const fcp = performance.getEntriesByName('first-contentful-paint')[0];
        const fp = performance.getEntriesByName('first-paint')[0];
        const ready = performance.getEntriesByName('qcowd-interactive')[0];
        return { fp: fp ? fp.startTime : null, fcp: fcp ? fcp.startTime : null, ready: ready ? ready.startTime : null };
      });
      return { ...m, wall };
    };
    t = Date.now();
    await api(d, 'GET', '/v1/images');
    console.log(`    GET /v1/images of 2000 images alone: ${Date.now() - t} ms`);
    const cat1 = await timing('', 'catalog');
    const rows = await page.locator('tbody tr').count();
    if (rows !== 100) throw new Error('the catalog shows ' + rows + ' rows on its first page');
    const summary = await page.textContent('.titlebar p');
    if (!summary.startsWith('2000 images')) throw new Error('summary ' + summary);
    // typing in the search stays quick with 2,000 images
    const t0 = Date.now();
    await page.getByLabel('Search images').fill('vm-1999');
    await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 1);
    const searchMs = Date.now() - t0;
    const searchDraw = await page.getAttribute('table.catalog', 'data-draw-ms');
    await page.getByLabel('Search images').fill('');
    await shot('catalog-2000');
    const jobs1 = await timing('#/jobs', 'jobs');
    await page.waitForFunction(() => document.querySelectorAll('article.job').length === 100);
    const counts = await page.textContent('.titlebar p');
    if (!counts.startsWith('500 jobs')) throw new Error('the jobs page counts ' + counts);
    t = Date.now();
    await page.getByLabel('Show').selectOption('active');
    await page.getByLabel('Show').selectOption('all');
    const filterMs = Date.now() - t;
    const filterDraw = await page.getAttribute('div.jobs', 'data-draw-ms');
    await shot('jobs-500');
    const f = (x) => (x === null ? '–' : x.toFixed(0) + ' ms');
    console.log(`    catalog, 2000 images: first paint ${f(cat1.fp)}, first contentful paint ${f(cat1.fcp)}, interactive ${f(cat1.ready)} (wall ${cat1.wall} ms); a search ${searchMs} ms (its redraw ${searchDraw} ms)`);
    console.log(`    jobs, 500 jobs: first paint ${f(jobs1.fp)}, first contentful paint ${f(jobs1.fcp)}, interactive ${f(jobs1.ready)} (wall ${jobs1.wall} ms); ${counts}; two filter changes ${filterMs} ms (the last redraw of 100 jobs ${filterDraw} ms)`);
    if (cat1.ready > 15000 || jobs1.ready > 15000) throw new Error('over 15 s to interactive');
    await c3.close();
    await stopQcowd(d);
  });
}

let code = 0;
try {
  await main();
} catch (e) {
  console.log('FAIL setup: ' + (e.stack || e));
  code = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const x of daemons) await stopQcowd(x);
  for (const x of daemons) {
    const bad = x.lines.filter((l) => /Sanitizer|runtime error/.test(l));
    if (bad.length || (x.exit !== 0 && x.exit !== null)) {
      console.log(`FAIL qcowd_clean_exit: exit ${x.exit}\n` + x.lines.slice(-40).join('\n'));
      code = 1;
    }
  }
  fs.rmSync(top, { recursive: true, force: true });
}
const failed = results.filter((r) => !r[1]).length;
console.log(`screenshots in ${ARTIFACTS}`);
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed || code ? 1 : 0);

// app.js: the dashboard's shell: login (a token kept for the session only), the
// shared store of images and jobs kept live by /v1/events, and the hash router
// (#/ the catalog, #/jobs, #/image/NAME).
import { call, enc, whoami, session, EventStream, allows } from './api.js';
import { el, clear, toast } from './util.js';
import * as catalog from './catalog.js';
import * as jobs from './jobs.js';
import * as image from './image.js';

// What every page reads; pages subscribe to changes with store.watch(fn(kind, key)).
export const store = {
  me: { name: '-', role: 'admin', auth: false },
  images: new Map(), // name -> the list entry ({name, ...info} or {name, error})
  imagesLoaded: false,
  jobsLoaded: false,
  jobs: new Map(), // id -> job, with _rate (bytes/s or units/s) and _samples
  watchers: new Set(),
  events: null,
  watch(fn) { this.watchers.add(fn); return () => this.watchers.delete(fn); },
  notify(kind, key) { for (const fn of [...this.watchers]) fn(kind, key); },
  can(need) { return allows(this.me.role, need); },

  async loadImages() {
    const list = await call('GET', '/v1/images');
    this.images = new Map(list.images.map((i) => [i.name, i]));
    this.imagesLoaded = true;
    this.notify('images');
  },
  async refreshImage(name) {
    try {
      const info = await call('GET', '/v1/images/' + enc(name));
      this.images.set(name, Object.assign({ name }, info));
    } catch (e) {
      if (e.status === 404) this.images.delete(name);
      else this.images.set(name, { name, error: { code: e.code, message: e.message } });
    }
    this.notify('image', name);
  },
  async loadJobs() {
    const list = await call('GET', '/v1/jobs');
    const seen = new Set();
    for (const j of list.jobs) { this.setJob(j, true); seen.add(j.id); }
    for (const id of [...this.jobs.keys()]) if (!seen.has(id)) this.jobs.delete(id);
    this.jobsLoaded = true;
    this.notify('jobs');
  },
  // Keep a job's newest state and a window of progress samples for its rate.
  setJob(j, quiet) {
    const old = this.jobs.get(j.id);
    const now = performance.now();
    const samples = old ? old._samples : [];
    if (j.status === 'running' && (!samples.length || samples[samples.length - 1].cur !== j['current-progress'])) {
      samples.push({ t: now, cur: j['current-progress'] });
      while (samples.length > 2 && now - samples[0].t > 10000) samples.shift();
    }
    if (j.status !== 'running') samples.length = 0;
    j._samples = samples;
    j._rate = samples.length > 1 ? (samples[samples.length - 1].cur - samples[0].cur) / ((samples[samples.length - 1].t - samples[0].t) / 1000) : (old && j.status === 'running' ? old._rate : null);
    this.jobs.set(j.id, j);
    if (!quiet) this.notify('job', j.id);
  },
  // The unfinished jobs touching image name (its own, or as a commit's base or a convert's target).
  busy(name) {
    const out = [];
    for (const j of this.jobs.values()) {
      if (j.status === 'concluded') continue;
      const p = j.params || {};
      if (j.image === name || p.base === name || p.target === name) out.push(j);
    }
    return out;
  },
};

const main = () => document.getElementById('main');
let page = null;

function route() {
  if (page && page.destroy) page.destroy();
  const h = location.hash.replace(/^#\/?/, '');
  const [what, ...rest] = h.split('/');
  for (const a of document.querySelectorAll('header nav a')) {
    const on = (a.dataset.page === (what || 'catalog')) || (what === 'image' && a.dataset.page === 'catalog');
    if (on) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const m = clear(main());
  if (what === 'jobs') page = jobs.render(m, store);
  else if (what === 'image' && rest.length) page = image.render(m, store, decodeURIComponent(rest.join('/')));
  else page = catalog.render(m, store);
  m.focus({ preventScroll: true });
}

function liveBadge(state) {
  const b = document.getElementById('live');
  b.hidden = false;
  b.dataset.state = state;
  b.textContent = state === 'live' ? 'live' : state === 'retrying' ? 'reconnecting…' : 'connecting…';
}

function startEvents() {
  const es = new EventStream();
  store.events = es;
  es.onstate = liveBadge;
  es.onopen = async () => {
    try {
      await store.loadJobs();
      if (store.imagesLoaded) await store.loadImages();
    } catch (e) { toast(e.describe ? e.describe() : String(e), 'error'); }
  };
  const job = (j) => store.setJob(j);
  es.on('job-created', job).on('job-status', job).on('job-progress', job);
  es.on('job-dismissed', (j) => { store.jobs.delete(j.id); store.notify('jobs'); });
  const img = (d) => { if (store.imagesLoaded && d && d.name) store.refreshImage(d.name); };
  es.on('image-created', img).on('image-changed', img);
  es.on('image-deleted', (d) => { store.images.delete(d.name); store.notify('image', d.name); });
  es.on('lost', () => es.onopen());
  es.run();
}

function showLogin(message) {
  if (store.events) { store.events.stop(); store.events = null; }
  document.getElementById('who').replaceChildren();
  document.getElementById('live').hidden = true;
  const input = el('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true, spellcheck: 'false' });
  const err = el('p.error', { role: 'alert', hidden: !message }, message || '');
  const form = el('form.login', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      session.token = input.value.trim();
      try {
        await boot();
      } catch (e) {
        session.token = '';
        err.textContent = e.describe ? e.describe() : String(e);
        err.hidden = false;
      }
    },
  },
  el('h1', 'Sign in to qcowd'),
  el('p', 'This qcowd needs a bearer token (from its ', el('code', '--tokens'), ' file). It is kept for this browser tab only.'),
  el('label.field', el('span', 'Token'), input), err,
  el('div.buttons', el('button.primary', { type: 'submit' }, 'Sign in')));
  clear(main(), form);
  input.focus();
}

async function boot() {
  let me;
  try {
    me = await whoami();
  } catch (e) {
    if (e.status === 401) {
      const had = !!session.token;
      session.token = '';
      showLogin(had ? e.describe() : '');
      return;
    }
    throw e;
  }
  store.me = me;
  const who = document.getElementById('who');
  clear(who, me.auth ? el('span', `${me.name} (${me.role})`) : el('span', 'no sign-in needed'),
    me.auth ? el('button.link', { type: 'button', onclick: () => { session.token = ''; location.hash = '#/'; showLogin(''); } }, 'Sign out') : null);
  session.onunauthorized = () => { session.token = ''; showLogin('The token is no longer valid: sign in again.'); };
  if (!store.events) startEvents();
  route();
}

window.addEventListener('hashchange', () => { if (store.events) route(); });
boot().catch((e) => {
  clear(main(), el('p.error', { role: 'alert' }, e.describe ? e.describe() : String(e)));
});
// For the tests: close the event stream's connection (it reconnects with Last-Event-ID).
window.qcowdDropEvents = () => store.events && store.events.drop();

// api.js: the qcowd REST API from the browser: JSON calls with the session's
// bearer token, errors as the API words them, the /v1/events stream read with
// fetch() (EventSource sends no Authorization), and uploads with progress.

const TOKEN_KEY = 'qcowd-token';

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY) || ''; },
  set token(t) { if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY); },
  onunauthorized: null, // called on a 401 (the token is missing, wrong or revoked)
};

function authHeaders(extra) {
  const h = Object.assign({}, extra);
  if (session.token) h.Authorization = 'Bearer ' + session.token;
  return h;
}

// An error answer: status, the API's code and message, Retry-After (seconds, or
// null) and the other fields of the error object (e.g. who holds a busy image).
export class ApiError extends Error {
  constructor(status, code, message, retryAfter, extra) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.extra = extra || {};
  }
  // The whole error as one line for a person: "409 conflict: MESSAGE (holder: job 3; retry after 5 s)".
  describe() {
    const more = Object.entries(this.extra).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`);
    if (this.retryAfter !== null && this.retryAfter !== undefined) more.push(`retry after ${this.retryAfter} s`);
    return `${this.status || 'network'} ${this.code}: ${this.message}` + (more.length ? ` (${more.join('; ')})` : '');
  }
}

async function toError(resp) {
  let code = 'http-' + resp.status, message = resp.statusText || 'request failed', extra = {};
  try {
    const body = await resp.json();
    if (body && body.error) {
      ({ code = code, message = message, ...extra } = body.error);
    }
  } catch { /* not JSON: keep the status line */ }
  const ra = resp.headers.get('Retry-After');
  return new ApiError(resp.status, code, message, ra === null ? null : ra, extra);
}

// One call: resolves with the parsed JSON body (null for an empty one, e.g. 204),
// rejects with an ApiError. body (an object) is sent as JSON, a Uint8Array as is.
// headers: extra request headers; with a Uint8Array body they say its type.
export async function call(method, path, body, headers) {
  const init = { method, headers: authHeaders(headers), cache: 'no-store' };
  if (body instanceof Uint8Array) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network-error', 'qcowd did not answer (' + e.message + ')', null);
  }
  if (resp.status === 401 && session.onunauthorized) session.onunauthorized();
  if (!resp.ok) throw await toError(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

export const enc = encodeURIComponent;

// Who the caller is: {name, role, auth}; role 'admin' without tokens. An older
// qcowd without /v1/whoami: every action is offered and the API decides.
export async function whoami() {
  try {
    return await call('GET', '/v1/whoami');
  } catch (e) {
    if (e.status === 404) return { name: '-', role: 'admin', auth: false };
    throw e;
  }
}

const RANK = { reader: 1, operator: 2, admin: 3 };
export function allows(role, need) { return (RANK[role] || 0) >= RANK[need]; }

// Download url as a file: a plain link when no token is needed, else fetched
// with the token into a blob (the browser cannot add headers to a link).
export async function download(url, filename) {
  let href = url, blobUrl = null;
  if (session.token) {
    const resp = await fetch(url, { headers: authHeaders() });
    if (!resp.ok) throw await toError(resp);
    blobUrl = href = URL.createObjectURL(await resp.blob());
  }
  const a = document.createElement('a');
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  if (blobUrl) setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
}

// PUT file to /v1/images/NAME/file from byte `from` on, with progress(sent,
// total) counting the whole file. A file with bytes goes as one resumable piece
// (Content-Range: bytes FROM-LAST/SIZE): if the connection breaks, qcowd keeps what
// arrived (uploadOffset() says how much) and a later call continues there.
// Resolves with the new image's info; rejects with an ApiError (status 0 on a
// network error). The returned promise has abort().
export function upload(name, file, progress, from = 0) {
  const xhr = new XMLHttpRequest();
  const p = new Promise((resolve, reject) => {
    xhr.open('PUT', '/v1/images/' + enc(name) + '/file');
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    if (file.size > 0) xhr.setRequestHeader('Content-Range', `bytes ${from}-${file.size - 1}/${file.size}`);
    if (session.token) xhr.setRequestHeader('Authorization', 'Bearer ' + session.token);
    xhr.upload.onprogress = (ev) => progress(from + ev.loaded, file.size);
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* empty */ }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      if (xhr.status === 401 && session.onunauthorized) session.onunauthorized();
      const e = body && body.error ? body.error : { code: 'http-' + xhr.status, message: xhr.statusText };
      const { code, message, ...extra } = e;
      reject(new ApiError(xhr.status, code, message, xhr.getResponseHeader('Retry-After'), extra));
    };
    xhr.onerror = () => reject(new ApiError(0, 'network-error', 'the connection broke during the upload', null));
    xhr.onabort = () => reject(new ApiError(0, 'aborted', 'upload cancelled', null));
    xhr.send(from ? file.slice(from) : file);
  });
  p.abort = () => xhr.abort();
  return p;
}

// How many bytes of a broken upload of `size` bytes qcowd kept for NAME (0: none,
// start again). Asked with Content-Range: bytes */SIZE and no body.
export async function uploadOffset(name, size) {
  try {
    const st = await call('PUT', '/v1/images/' + enc(name) + '/file', new Uint8Array(0),
      { 'Content-Range': `bytes */${size}`, 'Content-Type': 'application/octet-stream' });
    return st && st.total === size ? st.received : 0;
  } catch (e) {
    if (e.status === 404) return 0;
    throw e;
  }
}

// The /v1/events stream, kept open: on(type, fn(data, id)) for each event type;
// onstate(state) with 'connecting', 'live' or 'retrying'; onopen() after each
// (re)connection, before its events (the caller resyncs there: a qcowd without
// replay may have dropped events while we were away). Reconnects after the
// server's retry delay, sending Last-Event-ID. An 'lost' event means the
// server's history no longer holds what we missed: the caller resyncs too.
export class EventStream {
  constructor() {
    this.handlers = new Map();
    this.lastId = null;
    this.retry = 2000;
    this.state = 'connecting';
    this.onstate = () => {};
    this.onopen = async () => {};
    this.stopped = false;
    this.ctrl = null;
  }
  on(type, fn) { this.handlers.set(type, fn); return this; }
  setState(s) { if (s !== this.state) { this.state = s; this.onstate(s); } }
  stop() { this.stopped = true; if (this.ctrl) this.ctrl.abort(); }
  // Close the current connection (tests and a resume after sleep): it reconnects.
  drop() { if (this.ctrl) this.ctrl.abort(); }

  async run() {
    while (!this.stopped) {
      this.setState('connecting');
      try {
        await this.once();
      } catch { /* a network error, an abort: reconnect below */ }
      if (this.stopped) break;
      this.setState('retrying');
      await new Promise((r) => setTimeout(r, this.retry));
    }
  }

  async once() {
    this.ctrl = new AbortController();
    const headers = authHeaders({ Accept: 'text/event-stream' });
    if (this.lastId !== null) headers['Last-Event-ID'] = this.lastId;
    const resp = await fetch('/v1/events', { headers, signal: this.ctrl.signal, cache: 'no-store' });
    if (resp.status === 401 && session.onunauthorized) session.onunauthorized();
    if (!resp.ok) {
      const ra = parseInt(resp.headers.get('Retry-After') || '', 10);
      if (ra > 0) this.retry = Math.min(ra * 1000, 30000);
      return;
    }
    const queued = [];
    let opened = false;
    const opening = this.onopen().finally(() => { opened = true; });
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = '', ev = { type: 'message', data: [], id: null };
    this.setState('live');
    const dispatch = (e) => {
      if (!opened) { queued.push(e); return; }
      const fn = this.handlers.get(e.type);
      if (fn) { try { fn(e.data, e.id); } catch (err) { console.error(err); } }
    };
    opening.then(() => { for (const e of queued.splice(0)) dispatch(e); });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
        if (line === '') {
          // the id counts once its event is complete: a cut event is asked for again
          if (ev.id !== null) this.lastId = ev.id;
          if (ev.data.length) {
            let data = ev.data.join('\n');
            try { data = JSON.parse(data); } catch { /* keep the text */ }
            dispatch({ type: ev.type, data, id: ev.id });
          }
          ev = { type: 'message', data: [], id: null };
          continue;
        }
        if (line[0] === ':') continue; // a comment (keepalive)
        const c = line.indexOf(':');
        const name = c < 0 ? line : line.slice(0, c);
        let val = c < 0 ? '' : line.slice(c + 1);
        if (val[0] === ' ') val = val.slice(1);
        if (name === 'event') ev.type = val;
        else if (name === 'data') ev.data.push(val);
        else if (name === 'id' && !val.includes('\0')) ev.id = val;
        else if (name === 'retry' && /^\d+$/.test(val)) this.retry = parseInt(val, 10);
      }
    }
  }
}

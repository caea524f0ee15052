// util.js: DOM building without innerHTML (names from the API are never parsed
// as markup), number and time formats, toasts and modal dialogs.

// el('button.primary', {onclick, type: 'button'}, 'text', child...) -> an element.
export function el(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split('.');
  const e = document.createElement(tag || 'div');
  if (classes.length) e.className = classes.join(' ');
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'style') e.style.cssText = v; // CSSOM: allowed by the CSP, unlike a style attribute
    else if (k in e && typeof v !== 'string') e[k] = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  append(e, children);
  return e;
}

function append(e, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(e, c);
    else e.append(c instanceof Node ? c : String(c));
  }
}

export function clear(e, ...children) {
  e.replaceChildren();
  append(e, children);
  return e;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0) : String(n)) + ' ' + UNITS[i];
}

// "64M", "1.5G", "4096" -> bytes (binary units), or NaN.
export function parseSize(s) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$/i.exec(s || '');
  if (!m) return NaN;
  const mul = 1024 ** ' kmgtp'.indexOf((m[2] || ' ').toLowerCase());
  return Math.round(parseFloat(m[1]) * mul);
}

export function fmtDuration(s) {
  if (!Number.isFinite(s) || s < 0) return '–';
  if (s < 60) return Math.round(s) + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s';
  return Math.floor(s / 3600) + ' h ' + Math.round((s % 3600) / 60) + ' min';
}

// One formatter and one collator for the page: toLocaleString and localeCompare
// build a new one on each call, which shows with 500 jobs or 2,000 images.
const timeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' });
export const collator = new Intl.Collator(undefined, { numeric: true });

export function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : timeFmt.format(d);
}

// A short message at the bottom of the page; kind 'error' stays until closed.
export function toast(msg, kind = 'info') {
  const box = document.getElementById('toasts');
  const t = el('div.toast.' + kind, { role: kind === 'error' ? 'alert' : 'status' },
    el('span', msg),
    el('button.link', { type: 'button', 'aria-label': 'Close', onclick: () => t.remove() }, '×'));
  box.append(t);
  while (box.children.length > 5) box.firstChild.remove();
  if (kind !== 'error') setTimeout(() => t.remove(), 4000);
  return t;
}

// A modal dialog with body (nodes) and buttons [{label, value, primary, danger}];
// resolves with the value of the button pressed (null for Escape). onsubmit(form)
// may return a string to show as an error and keep the dialog open.
export function modal(title, body, buttons, onsubmit) {
  return new Promise((resolve) => {
    const dlg = el('dialog.modal', { 'aria-label': title });
    const err = el('p.error', { role: 'alert', hidden: true });
    const form = el('form', { method: 'dialog' },
      el('h2', title), body, err,
      el('div.buttons', buttons.map((b) => el('button' + (b.primary ? '.primary' : '') + (b.danger ? '.danger' : ''),
        { type: b.value === null ? 'button' : 'submit', value: String(b.value), onclick: b.value === null ? () => dlg.close() : undefined },
        b.label))));
    form.addEventListener('submit', async (ev) => {
      const v = ev.submitter ? ev.submitter.value : String(buttons.find((b) => b.primary)?.value);
      if (onsubmit && v !== 'null' && v !== 'false') {
        ev.preventDefault();
        const msg = await onsubmit(form, v);
        if (msg) { err.textContent = msg; err.hidden = false; return; }
        dlg.close(v);
      } else if (!ev.submitter) { // Enter in a field: the primary button
        ev.preventDefault();
        dlg.close(v);
      }
    });
    dlg.append(form);
    dlg.addEventListener('close', () => { dlg.remove(); resolve(dlg.returnValue && dlg.returnValue !== 'null' ? dlg.returnValue : null); });
    document.body.append(dlg);
    dlg.showModal();
    const first = form.querySelector('input, select, textarea');
    if (first) first.focus();
  });
}

export function confirmDialog(title, text, label = 'Delete') {
  return modal(title, el('p', text), [{ label: 'Cancel', value: null }, { label, value: 'yes', primary: true, danger: true }])
    .then((v) => v === 'yes');
}

// A labelled form field: field('Name', input, hint) -> <label>; the input is named
// by the label alone, the hint describes it.
let fieldIds = 0;
export function field(label, input, hint) {
  const id = 'f' + ++fieldIds;
  const span = el('span', { id: id + 'l' }, label);
  input.setAttribute('aria-labelledby', id + 'l');
  if (hint) input.setAttribute('aria-describedby', id + 'h');
  return el('label.field', span, input, hint ? el('small', { id: id + 'h' }, hint) : null);
}

// Pages of rows: the rows [from, to) of page p with size n, and a pager element.
export function pager(total, page, size, go) {
  const pages = Math.max(1, Math.ceil(total / size));
  if (pages === 1) return el('nav.pager', { 'aria-label': 'Pages' }, el('span', total + ' shown'));
  return el('nav.pager', { 'aria-label': 'Pages' },
    el('button', { type: 'button', disabled: page === 0, onclick: () => go(page - 1) }, '‹ Previous'),
    el('span', `page ${page + 1} of ${pages} (${total})`),
    el('button', { type: 'button', disabled: page >= pages - 1, onclick: () => go(page + 1) }, 'Next ›'));
}

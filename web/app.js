/* portmux console: reads the JSON API every 2 s and renders it. No framework, no build.
 * Rule kept throughout: API data reaches the page only through textContent or attributes,
 * never through innerHTML. */
'use strict';

(function () {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const SPARK_POINTS = 30;
  const TOKEN_KEY = 'portmux.api_token';
  const FIELDS = ['port', 'target_ip', 'target_port', 'use_tunnel', 'client', 'name',
    'allow_from', 'proxy_protocol', 'max_connections', 'rate_limit', 'enabled'];
  /* The fields the edit dialog changes (every §2 field but port, mode and client). */
  const EDIT_FIELDS = ['target_ip', 'target_port', 'name', 'allow_from', 'proxy_protocol',
    'max_connections', 'rate_limit'];
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);

  const state = {
    conn: 'connecting',
    rows: new Map(),      /* port -> row record (see makeRow) */
    history: new Map(),   /* "id:port" -> {last, rates} for the sparklines */
    timer: null,
    running: false,
    again: false,
    lastUpdate: null,
    pendingRemove: null,
    pendingClient: null,  /* {action, name} while the client dialog is open */
    clientRows: new Map(), /* name -> client row record (see makeClientRow) */
    connected: new Set(), /* names of the tunnel clients connected at the last poll */
    returnFocus: null,
    editing: null,        /* the mapping the edit dialog shows */
  };

  /* ---------------------------------------------------------------- formatting */

  function fmtBytes(n) {
    if (typeof n !== 'number' || !isFinite(n) || n < 0) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    const digits = i === 0 || n >= 100 ? 0 : n >= 10 ? 1 : 2;
    return n.toFixed(digits) + ' ' + units[i];
  }

  function fmtDuration(s) {
    if (typeof s !== 'number' || !isFinite(s) || s < 0) return '–';
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + sec + 's';
    return sec + 's';
  }

  /* connected_at / created_at: Unix seconds, or a date string. */
  function toDate(v) {
    if (typeof v === 'number' && isFinite(v)) return new Date(v * 1000);
    if (typeof v === 'string' && v) {
      const t = Date.parse(v);
      if (!isNaN(t)) return new Date(t);
    }
    return null;
  }

  function fmtSince(v) {
    const d = toDate(v);
    if (!d) return typeof v === 'string' ? v : '–';
    const ago = (Date.now() - d.getTime()) / 1000;
    return d.toLocaleString() + ' (' + fmtDuration(Math.max(0, ago)) + ' ago)';
  }

  function fmtRtt(ms) {
    if (typeof ms !== 'number' || !isFinite(ms) || ms < 0) return '–';
    return (ms < 10 ? ms.toFixed(1) : ms.toFixed(0)) + ' ms';
  }

  function fmtTarget(m) {
    const host = m.target_ip || (m.use_tunnel ? '127.0.0.1' : '');
    return host.includes(':') ? '[' + host + ']:' + m.target_port : host + ':' + m.target_port;
  }

  function fmtRate(n) {
    return n > 0 ? fmtBytes(n) + '/s' : '';
  }

  /* One line for the policy cell: only what differs from the defaults. */
  function fmtPolicy(m) {
    const parts = [];
    const allow = m.allow_from || [];
    if (allow.length) parts.push('allow ' + allow.join(', '));
    if (m.proxy_protocol && m.proxy_protocol !== 'none') parts.push('PROXY ' + m.proxy_protocol);
    if (m.rate_limit > 0) parts.push('≤ ' + fmtRate(m.rate_limit));
    if (typeof m.max_connections === 'number') parts.push('max ' + m.max_connections + ' conns');
    return parts.join(' · ');
  }

  function statusLabel(s) {
    return String(s || 'unknown').replace(/_/g, ' ');
  }

  /* ---------------------------------------------------------------- DOM helpers */

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function cell(label, cls) {
    const td = el('td', cls);
    td.dataset.label = label;
    return td;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function notice(text, isError) {
    const n = $('notice');
    n.textContent = text;
    n.classList.toggle('is-error', !!isError);
  }

  /* ---------------------------------------------------------------- token */

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || '';
    } catch (e) {
      return '';
    }
  }

  function setToken(t) {
    try {
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: the token lives until the next 401 */
    }
  }

  /* ---------------------------------------------------------------- HTTP */

  /* Resolves to {status, payload}; rejects only when the server could not be reached. */
  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    const token = getToken();
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const resp = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
        cache: 'no-store',
        credentials: 'same-origin',
      });
      let payload = null;
      try {
        payload = await resp.json();
      } catch (e) {
        payload = null;
      }
      return { status: resp.status, payload };
    } catch (e) {
      throw new Error(e.name === 'AbortError' ? 'no answer within 5 s' : 'cannot reach the server');
    } finally {
      clearTimeout(timer);
    }
  }

  function envelopeData(r) {
    if (r.status !== 200 || !r.payload || r.payload.success !== true || !r.payload.data) {
      const msg = r.payload && r.payload.message ? r.payload.message : 'HTTP ' + r.status;
      throw new Error(msg);
    }
    return r.payload.data;
  }

  /* ---------------------------------------------------------------- connection state */

  const CONN_TEXT = {
    connecting: 'connecting…',
    live: 'live',
    disconnected: 'disconnected',
    'needs-token': 'token needed',
    'wrong-token': 'wrong token',
  };

  function setConn(conn, reason) {
    const prev = state.conn;
    state.conn = conn;
    const badge = $('conn-state');
    badge.className = 'badge state-' + conn;
    setText(badge, CONN_TEXT[conn]);
    document.body.classList.toggle('is-stale', conn === 'disconnected');
    showBanner(conn, reason);
    showTokenPanel(conn, prev);
    $('token-change').hidden = !(conn === 'live' && getToken());
  }

  function showBanner(conn, reason) {
    const b = $('banner');
    if (conn !== 'disconnected') {
      b.hidden = true;
      return;
    }
    const since = state.lastUpdate ? ' The figures below are from ' +
      state.lastUpdate.toLocaleTimeString() + '.' : '';
    b.textContent = 'Disconnected: ' + reason + '. Retrying every 2 s.' + since;
    b.hidden = false;
  }

  function showTokenPanel(conn, prev) {
    const asking = conn === 'needs-token' || conn === 'wrong-token';
    $('token-panel').hidden = !asking;
    $('data').hidden = asking;
    $('token-error').hidden = conn !== 'wrong-token';
    $('token-input').setAttribute('aria-invalid', conn === 'wrong-token' ? 'true' : 'false');
    if (asking && prev !== conn) {
      const input = $('token-input');
      input.focus();
      input.select();
    }
  }

  function handleUnauthorized() {
    clearData();
    setConn(getToken() ? 'wrong-token' : 'needs-token');
  }

  /* Nothing of the previous token's data stays on screen once the API refuses us. */
  function clearData() {
    for (const row of state.rows.values()) row.tr.remove();
    state.rows.clear();
    state.history.clear();
    $('clients-body').replaceChildren();
    state.clientRows.clear();
    hideTokenQuietly();
    updateEmpty();
  }

  /* ---------------------------------------------------------------- poll loop */

  async function poll() {
    try {
      const health = await api('GET', '/health');
      if (health.status !== 200 || !health.payload || health.payload.status !== 'ok') {
        throw new Error(health.payload && health.payload.message
          ? health.payload.message : '/health answered HTTP ' + health.status);
      }
      renderHealth(health.payload);
      /* Refused once: ask the API again only with a new token, not every 2 s. */
      if (state.conn === 'needs-token' || state.conn === 'wrong-token') return;
      const [list, clients] = await Promise.all([
        api('GET', '/api/mapping/list'),
        api('GET', '/api/clients'),
      ]);
      if (list.status === 401 || clients.status === 401) {
        handleUnauthorized();
        return;
      }
      const clientList = envelopeData(clients).clients || [];
      state.connected = new Set(clientList.filter((c) => c.connected).map((c) => String(c.name)));
      renderMappings(envelopeData(list).mappings || []);
      renderClients(clientList);
      state.lastUpdate = new Date();
      setText($('last-update'), state.lastUpdate.toLocaleTimeString());
      setConn('live');
    } catch (e) {
      setConn('disconnected', e.message);
    }
  }

  /* One loop: a refresh asked for while a poll runs happens right after it. */
  async function loop() {
    clearTimeout(state.timer);
    if (state.running) {
      state.again = true;
      return;
    }
    state.running = true;
    try {
      await poll();
    } finally {
      state.running = false;
    }
    if (state.again) {
      state.again = false;
      loop();
      return;
    }
    state.timer = setTimeout(loop, POLL_MS);
  }

  /* ---------------------------------------------------------------- health */

  function renderHealth(h) {
    setText($('h-version'), String(h.version || '–'));
    setText($('h-uptime'), fmtDuration(h.uptime_s));
    const tunnel = !h.tunnel_enabled ? 'off' : h.tunnel_connected ? 'on · connected' : 'on · no client';
    setText($('h-tunnel'), tunnel);
    $('h-tunnel').className = h.tunnel_enabled ? (h.tunnel_connected ? 'ok' : 'warn') : 'muted';
    setText($('h-clients'), String(h.clients ?? '–'));
    setText($('h-mappings'), String(h.mappings ?? '–'));
    const r = h.port_range;
    setText($('port-range'), r ? 'range ' + r.from + '–' + r.end : '');
    $('port-range').title = r ? 'port_range: ' + r.from + '–' + r.end + ', blacklisted ports aside' : '';
  }

  /* Where the public connects: this page's host (what the browser reached the server
   * by) and the mapping's port. */
  function publicAddr(port) {
    const host = window.location.hostname || '127.0.0.1';
    return (host.includes(':') && !host.startsWith('[') ? '[' + host + ']' : host) + ':' + port;
  }

  /* ---------------------------------------------------------------- mappings */

  function makeRow(m) {
    const tr = el('tr');
    tr.dataset.port = String(m.port);
    const c = {
      port: el('th', 'c-port'),
      name: cell('Name', 'c-name'),
      mode: cell('Mode', 'c-mode'),
      target: cell('Target', 'c-target'),
      client: cell('Client', 'c-client'),
      status: cell('Status', 'c-status'),
      conns: cell('Connections', 'c-conns num'),
      refused: cell('Refused', 'c-refused num'),
      policy: cell('Policy', 'c-policy'),
      bytesIn: cell('To target', 'c-bytes-in num'),
      bytesOut: cell('From target', 'c-bytes-out num'),
      spark: cell('Traffic', 'c-spark'),
      actions: cell('', 'c-actions'),
    };
    c.port.scope = 'row';
    c.port.dataset.label = 'Port';
    const portNum = el('span', 'port-num');
    const addr = el('code', 'public-addr');
    c.port.append(portNum, addr);
    const clientName = el('span', 'client-name');
    const clientState = el('span', 'client-state');
    c.client.append(clientName, clientState);
    const badge = el('span', 'status');
    const err = el('span', 'status-detail');
    c.status.append(badge, err);
    const svg = makeSpark();
    c.spark.append(svg);
    const edit = el('button', 'btn-small edit', 'Edit');
    edit.type = 'button';
    edit.setAttribute('aria-label', 'Edit mapping on port ' + m.port);
    edit.addEventListener('click', () => openEdit(m.port));
    const toggle = el('button', 'btn-small toggle', 'Disable');
    toggle.type = 'button';
    toggle.addEventListener('click', () => toggleEnabled(m.port));
    const btn = el('button', 'btn-danger btn-small remove', 'Remove');
    btn.type = 'button';
    btn.setAttribute('aria-label', 'Remove mapping on port ' + m.port);
    btn.addEventListener('click', () => askRemove(m.port));
    c.actions.append(edit, toggle, btn);
    tr.append(...Object.values(c));
    return { tr, c, badge, err, svg, toggle, id: m.id, text: '', m, portNum, addr, clientName,
      clientState };
  }

  function updateRow(row, m) {
    const c = row.c;
    setText(row.portNum, String(m.port));
    setText(row.addr, publicAddr(m.port));
    row.addr.title = 'connect to ' + publicAddr(m.port);
    setText(c.name, m.name || '');
    setText(c.mode, m.use_tunnel ? 'tunnel' : 'direct');
    setText(c.target, fmtTarget(m));
    const client = m.use_tunnel ? m.client || 'default' : '';
    setText(row.clientName, m.use_tunnel ? client : '–');
    const up = state.connected.has(client);
    setText(row.clientState, m.use_tunnel ? (up ? 'connected' : 'not connected') : '');
    row.clientState.className = 'client-state ' + (up ? 'ok' : 'warn');
    row.tr.dataset.status = m.status;
    row.badge.className = 'status status-' + m.status;
    setText(row.badge, statusLabel(m.status));
    setText(row.err, m.status === 'error' && m.error ? m.error
      : m.last_error ? 'last failed dial: ' + m.last_error : '');
    row.err.title = m.last_error_at ? 'at ' + m.last_error_at : '';
    setText(c.conns, m.active_connections + ' / ' + m.total_connections + ' / ' + m.failed_connections);
    c.conns.title = m.active_connections + ' active, ' + m.total_connections + ' total, ' +
      m.failed_connections + ' failed';
    setText(c.refused, String(m.refused_connections ?? 0));
    setText(c.policy, fmtPolicy(m));
    row.m = m;
    row.tr.classList.toggle('is-disabled', m.enabled === false);
    setText(row.toggle, m.enabled === false ? 'Enable' : 'Disable');
    row.toggle.setAttribute('aria-label', (m.enabled === false ? 'Enable' : 'Disable') +
      ' mapping on port ' + m.port);
    setBytes(c.bytesIn, m.bytes_in);
    setBytes(c.bytesOut, m.bytes_out);
    const created = toDate(m.created_at);
    row.tr.title = created ? 'created ' + created.toLocaleString() : '';
    row.text = [m.port, m.name, m.use_tunnel ? 'tunnel' : 'direct', fmtTarget(m), fmtPolicy(m),
      m.use_tunnel ? m.client : '', statusLabel(m.status), m.status, m.error || '']
      .join(' ').toLowerCase();
  }

  function setBytes(td, n) {
    setText(td, fmtBytes(n));
    td.dataset.bytes = String(n);
    td.title = n + ' bytes';
  }

  function dropRow(key, row) {
    row.tr.remove();
    state.rows.delete(key);
    state.history.delete(row.id + ':' + key);
  }

  function renderMappings(list) {
    const body = $('mappings-body');
    const seen = new Set();
    list.slice().sort((a, b) => a.port - b.port).forEach((m, i) => {
      const key = String(m.port);
      seen.add(key);
      let row = state.rows.get(key);
      if (!row || row.id !== m.id) {
        if (row) dropRow(key, row);
        row = makeRow(m);
        state.rows.set(key, row);
      }
      updateRow(row, m);
      drawSpark(row.svg, trackRates(m));
      /* Move a row only when it is out of place: re-inserting would drop keyboard focus. */
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
    });
    for (const [key, row] of state.rows) if (!seen.has(key)) dropRow(key, row);
    setText($('mappings-count'), '(' + list.length + ')');
    applyFilter();
  }

  /* ---------------------------------------------------------------- sparklines */

  /* Bytes per second in each direction between successive polls, newest last. */
  function trackRates(m) {
    const key = m.id + ':' + m.port;
    const now = performance.now();
    let h = state.history.get(key);
    if (!h) {
      h = { last: null, rates: [] };
      state.history.set(key, h);
    }
    if (h.last) {
      const dt = Math.max(0.001, (now - h.last.t) / 1000);
      h.rates.push({
        in: Math.max(0, m.bytes_in - h.last.in) / dt,
        out: Math.max(0, m.bytes_out - h.last.out) / dt,
      });
      if (h.rates.length > SPARK_POINTS) h.rates.shift();
    }
    h.last = { t: now, in: m.bytes_in, out: m.bytes_out };
    return h.rates;
  }

  function makeSpark() {
    const svg = document.createElementNS(SVG_NS, 'svg');
    svg.setAttribute('class', 'spark');
    svg.setAttribute('viewBox', '0 0 100 24');
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    const title = document.createElementNS(SVG_NS, 'title');
    svg.append(title);
    for (const cls of ['spark-base', 'spark-in', 'spark-out']) {
      const line = document.createElementNS(SVG_NS, 'polyline');
      line.setAttribute('class', cls);
      line.setAttribute('vector-effect', 'non-scaling-stroke');
      svg.append(line);
    }
    return svg;
  }

  function sparkPoints(values, max) {
    const step = 100 / (SPARK_POINTS - 1);
    const x0 = 100 - (values.length - 1) * step;
    return values.map((v, i) =>
      (x0 + i * step).toFixed(2) + ',' + (22 - (v / max) * 20).toFixed(2)).join(' ');
  }

  function drawSpark(svg, rates) {
    const [title, base, lineIn, lineOut] = svg.children;
    const max = Math.max(1, ...rates.map((r) => Math.max(r.in, r.out)));
    base.setAttribute('points', '0,22 100,22');
    lineIn.setAttribute('points', sparkPoints(rates.map((r) => r.in), max));
    lineOut.setAttribute('points', sparkPoints(rates.map((r) => r.out), max));
    const last = rates[rates.length - 1];
    const text = last ? 'now: in ' + fmtBytes(last.in) + '/s, out ' + fmtBytes(last.out) + '/s'
      : 'no traffic samples yet';
    setText(title, text);
    svg.setAttribute('aria-label', 'Traffic ' + text);
  }

  /* ---------------------------------------------------------------- filter */

  function applyFilter() {
    const q = $('filter').value.trim().toLowerCase();
    for (const row of state.rows.values()) row.tr.hidden = q !== '' && !row.text.includes(q);
    updateEmpty();
  }

  function updateEmpty() {
    const q = $('filter').value.trim();
    const total = state.rows.size;
    const shown = [...state.rows.values()].filter((r) => !r.tr.hidden).length;
    const empty = $('mappings-empty');
    empty.hidden = shown > 0;
    empty.textContent = total === 0 ? 'No mappings yet. Create one above.'
      : 'No mapping matches “' + q + '”.';
    $('clients-empty').hidden = $('clients-body').children.length > 0;
  }

  /* ---------------------------------------------------------------- clients */

  /* Rows are kept per name and updated in place, so a button the user is about to press
   * is not replaced under the pointer by the next poll. */
  function makeClientRow(c) {
    const tr = el('tr');
    tr.dataset.name = String(c.name);
    const name = el('th', 'c-name', String(c.name));
    name.scope = 'row';
    name.dataset.label = 'Name';
    const cells = {
      addr: cell('Address', 'c-addr'),
      since: cell('Connected since', 'c-since'),
      streams: cell('Streams', 'num'),
      rtt: cell('RTT', 'num'),
      toTarget: cell('To target', 'num c-to-target'),
      fromTarget: cell('From target', 'num c-from-target'),
      state: cell('State', 'c-state'),
      source: cell('Source', 'c-source'),
      actions: cell('', 'c-actions'),
    };
    const badge = el('span', 'status');
    cells.state.append(badge);
    if (c.source === 'api') {
      const rotate = el('button', 'btn-small rotate', 'Rotate');
      rotate.type = 'button';
      rotate.setAttribute('aria-label', 'Rotate the token of client ' + c.name);
      rotate.addEventListener('click', () => askClient('rotate', String(c.name)));
      const remove = el('button', 'btn-danger btn-small remove', 'Remove');
      remove.type = 'button';
      remove.setAttribute('aria-label', 'Remove client ' + c.name);
      remove.addEventListener('click', () => askClient('remove', String(c.name)));
      cells.actions.append(rotate, remove);
    } else {
      cells.actions.append(el('span', 'muted', 'config file'));
    }
    tr.append(name, ...Object.values(cells));
    return { tr, cells, badge, source: c.source };
  }

  function updateClientRow(row, c) {
    const k = row.cells;
    setText(k.addr, c.connected ? String(c.remote_addr || '–') : '–');
    setText(k.since, c.connected ? fmtSince(c.connected_at)
      : (c.last_seen ? 'last seen ' + fmtSince(c.last_seen) : 'never connected'));
    setText(k.streams, c.connected ? String(c.streams ?? '–') : '–');
    setText(k.rtt, c.connected ? fmtRtt(c.rtt_ms) : '–');
    /* The server counts a client's bytes as the tunnel sees them: out goes to the client
     * (towards its targets), in comes back; shown in the mappings table's order. */
    setText(k.toTarget, fmtBytes(c.bytes_out || 0));
    setText(k.fromTarget, fmtBytes(c.bytes_in || 0));
    setText(row.badge, c.connected ? 'connected' : 'not connected');
    row.badge.className = 'status ' + (c.connected ? 'status-listening' : 'status-waiting_for_client');
    setText(k.source, String(c.source || ''));
  }

  function renderClients(list) {
    const sorted = list.slice().sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const seen = new Set();
    const body = $('clients-body');
    sorted.forEach((c, i) => {
      const key = String(c.name);
      seen.add(key);
      let row = state.clientRows.get(key);
      if (row && row.source !== c.source) {
        row.tr.remove();
        row = null;
      }
      if (!row) {
        row = makeClientRow(c);
        state.clientRows.set(key, row);
      }
      updateClientRow(row, c);
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
    });
    for (const [key, row] of state.clientRows) {
      if (!seen.has(key)) {
        row.tr.remove();
        state.clientRows.delete(key);
      }
    }
    setText($('clients-count'), '(' + list.length + ')');
    const connected = list.filter((c) => c.connected).length;
    $('clients-title').dataset.connected = String(connected);
    updateEmpty();
  }

  /* ---------------------------------------------------------------- client actions */

  function showToken(title, token) {
    setText($('client-token-title'), title);
    $('client-token').value = token;
    setText($('client-token-copy'), 'Copy');
    $('client-token-box').hidden = false;
    $('client-token').focus();
    $('client-token').select();
  }

  /* A token on screen goes with the data when the API token does. */
  function hideTokenQuietly() {
    $('client-token').value = '';
    $('client-token-box').hidden = true;
  }

  function hideToken() {
    $('client-token').value = '';
    $('client-token-box').hidden = true;
    $('client-name').focus();
  }

  async function copyToken() {
    const input = $('client-token');
    let ok = false;
    try {
      await navigator.clipboard.writeText(input.value);
      ok = true;
    } catch (e) {
      /* no clipboard permission: the selection and the old command still work */
      input.focus();
      input.select();
      try {
        ok = document.execCommand('copy');
      } catch (e2) {
        ok = false;
      }
    }
    setText($('client-token-copy'), ok ? 'Copied' : 'Press Ctrl+C');
    if (!ok) {
      input.focus();
      input.select();
    }
  }

  function clientFormError(text) {
    const e = $('client-form-error');
    e.textContent = text || '';
    e.hidden = !text;
    $('client-name').setAttribute('aria-invalid', text ? 'true' : 'false');
  }

  async function onClientCreate(ev) {
    ev.preventDefault();
    const name = $('client-name').value.trim();
    const btn = $('client-create');
    btn.disabled = true;
    try {
      const r = await api('POST', '/api/client/create', { name });
      if (r.status === 401) {
        handleUnauthorized();
      } else if (r.status === 201 && r.payload && r.payload.success) {
        clientFormError('');
        $('client-name').value = '';
        showToken('Token of the new client “' + r.payload.data.name + '”', r.payload.data.token);
        notice('Client ' + r.payload.data.name + ' created.');
      } else {
        clientFormError((r.payload && r.payload.message) || 'HTTP ' + r.status);
        $('client-name').focus();
      }
    } catch (e) {
      clientFormError('Not created: ' + e.message + '.');
    } finally {
      btn.disabled = false;
    }
    loop();
  }

  function askClient(action, name) {
    const dlg = $('client-dialog');
    state.pendingClient = { action, name };
    state.returnFocus = document.activeElement;
    if (action === 'rotate') {
      setText($('client-dialog-title'), 'Rotate token?');
      setText($('client-dialog-text'), 'Client ' + name + ' gets a new token, shown once. ' +
        'The old one keeps working for 5 minutes; the live session stays.');
      setText($('client-dialog-yes'), 'Rotate');
    } else {
      setText($('client-dialog-title'), 'Remove client?');
      setText($('client-dialog-text'), 'Client ' + name + ' can no longer connect and its ' +
        'live session is closed now. Its mappings stay, waiting for a client of that name.');
      setText($('client-dialog-yes'), 'Remove');
    }
    dlg.showModal();
    $('client-dialog-no').focus();
  }

  function onClientDialogClose() {
    state.pendingClient = null;
    const back = state.returnFocus;
    state.returnFocus = null;
    if (back && document.contains(back)) back.focus();
    else $('clients').focus();
  }

  async function doClientAction() {
    const pending = state.pendingClient;
    state.returnFocus = null;
    $('client-dialog').close();
    if (!pending) return;
    const { action, name } = pending;
    try {
      const r = await api('POST', '/api/client/' + action, { name });
      if (r.status === 401) {
        handleUnauthorized();
      } else if (r.status === 200 && r.payload && r.payload.success) {
        if (action === 'rotate') {
          showToken('New token of client “' + name + '” (the old one works until ' +
            r.payload.data.old_token_valid_until + ')', r.payload.data.token);
          notice('Token of client ' + name + ' rotated.');
        } else {
          notice('Client ' + name + ' removed.');
        }
      } else {
        notice('Client ' + name + ': ' + action + ' failed: ' +
          ((r.payload && r.payload.message) || 'HTTP ' + r.status), true);
      }
    } catch (e) {
      notice('Client ' + name + ': ' + action + ' failed: ' + e.message + '.', true);
    }
    loop();
  }

  /* ---------------------------------------------------------------- create form */

  /* Digits become a JSON integer; anything else goes as typed so the server names it. */
  function numberOrRaw(s) {
    return /^\d{1,15}$/.test(s) ? Number(s) : s;
  }

  /* One CIDR per line (commas and spaces work too); empty = anyone. */
  function cidrList(text) {
    return text.split(/[\s,]+/).filter((x) => x !== '');
  }

  function readForm() {
    const v = (id) => $(id).value.trim();
    const tunnel = $('f-mode-tunnel').checked;
    const body = {};
    if (v('f-port') !== '') body.port = numberOrRaw(v('f-port'));
    if (v('f-target-ip') !== '') body.target_ip = v('f-target-ip');
    if (v('f-target-port') !== '') body.target_port = numberOrRaw(v('f-target-port'));
    body.use_tunnel = tunnel;
    if (tunnel && v('f-client') !== '') body.client = v('f-client');
    if (v('f-name') !== '') body.name = v('f-name');
    const allow = cidrList(v('f-allow-from'));
    if (allow.length) body.allow_from = allow;
    if (v('f-proxy-protocol') !== 'none') body.proxy_protocol = v('f-proxy-protocol');
    if (v('f-max-connections') !== '') body.max_connections = numberOrRaw(v('f-max-connections'));
    if (v('f-rate-limit') !== '') body.rate_limit = numberOrRaw(v('f-rate-limit'));
    if (!$('f-enabled').checked) body.enabled = false;
    return body;
  }

  function fieldInput(field) {
    if (field === 'use_tunnel') return $('f-mode-tunnel').checked ? $('f-mode-tunnel') : $('f-mode-direct');
    return $('f-' + field.replace('_', '-'));
  }

  function clearFormErrors() {
    for (const f of FIELDS) {
      const e = $('err-' + f);
      e.hidden = true;
      e.textContent = '';
      fieldInput(f).removeAttribute('aria-invalid');
    }
    $('form-error').hidden = true;
  }

  /* Which field an API error is about: its code, else the message's first word. */
  function errorField(payload) {
    if (payload.error === 'port_out_of_range' || payload.error === 'port_in_use' ||
      payload.error === 'range_exhausted') return 'port';
    const m = /^([a-z_]+)/.exec(payload.message || '');
    return m && FIELDS.includes(m[1]) ? m[1] : null;
  }

  function showCreateError(payload, status) {
    const p = payload || {};
    const msg = p.message || 'the server answered HTTP ' + status;
    const field = errorField(p);
    if (!field) {
      const fe = $('form-error');
      fe.textContent = 'Not created: ' + msg;
      fe.hidden = false;
      return;
    }
    const e = $('err-' + field);
    e.textContent = msg;
    e.hidden = false;
    const input = fieldInput(field);
    input.setAttribute('aria-invalid', 'true');
    input.focus();
  }

  function syncMode() {
    const tunnel = $('f-mode-tunnel').checked;
    $('f-client').disabled = !tunnel;
    $('f-target-ip').placeholder = tunnel ? '127.0.0.1 (dialled by the client)' : 'e.g. 127.0.0.1';
  }

  async function onCreate(ev) {
    ev.preventDefault();
    clearFormErrors();
    const body = readForm();
    const submit = $('f-submit');
    submit.disabled = true;
    try {
      const r = await api('POST', '/api/mapping/create', body);
      if (r.status === 401) {
        handleUnauthorized();
      } else if (r.status === 201 && r.payload && r.payload.success) {
        $('create-form').reset();
        syncMode();
        notice('Mapping on port ' + r.payload.data.port + ' created.');
        loop();
      } else {
        showCreateError(r.payload, r.status);
      }
    } catch (e) {
      $('form-error').textContent = 'Not created: ' + e.message + '.';
      $('form-error').hidden = false;
    } finally {
      submit.disabled = false;
    }
  }

  /* ---------------------------------------------------------------- edit and toggle */

  function editInput(field) {
    return $('e-' + field.replace('_', '-'));
  }

  function clearEditErrors() {
    for (const f of EDIT_FIELDS) {
      const e = $('eerr-' + f);
      e.hidden = true;
      e.textContent = '';
      editInput(f).removeAttribute('aria-invalid');
    }
    $('edit-error').hidden = true;
  }

  function openEdit(port) {
    const row = state.rows.get(String(port));
    if (!row) return;
    const m = row.m;
    state.editing = m.port;
    state.returnFocus = document.activeElement;
    clearEditErrors();
    $('edit-title').textContent = 'Edit mapping on port ' + m.port;
    $('e-target-ip').value = m.target_ip || '';
    $('e-target-port').value = String(m.target_port);
    $('e-name').value = m.name || '';
    $('e-allow-from').value = (m.allow_from || []).join('\n');
    $('e-proxy-protocol').value = m.proxy_protocol || 'none';
    $('e-max-connections').value = String(m.max_connections ?? '');
    $('e-rate-limit').value = String(m.rate_limit ?? 0);
    // What the form showed when it opened: a save sends only the fields changed since, so
    // it neither pins values the server filled in (max_connections shows the config's
    // default when the mapping has none of its own) nor undoes a change made elsewhere
    // meanwhile to a field this dialog did not touch.
    state.editShown = {};
    for (const f of EDIT_FIELDS) state.editShown[editInput(f).id] = editInput(f).value.trim();
    $('edit-dialog').showModal();
    $('e-target-ip').focus();
  }

  function readEdit() {
    const v = (id) => $(id).value.trim();
    const changed = (id) => v(id) !== (state.editShown || {})[id];
    const body = { port: state.editing };
    if (changed('e-target-ip') && v('e-target-ip') !== '') body.target_ip = v('e-target-ip');
    if (changed('e-target-port')) body.target_port = numberOrRaw(v('e-target-port'));
    if (changed('e-name')) body.name = v('e-name');
    if (changed('e-allow-from')) body.allow_from = cidrList(v('e-allow-from'));
    if (changed('e-proxy-protocol')) body.proxy_protocol = v('e-proxy-protocol');
    if (changed('e-max-connections') && v('e-max-connections') !== '') {
      body.max_connections = numberOrRaw(v('e-max-connections'));
    }
    if (changed('e-rate-limit')) {
      body.rate_limit = v('e-rate-limit') === '' ? 0 : numberOrRaw(v('e-rate-limit'));
    }
    return body;
  }

  function showEditError(payload, status) {
    const p = payload || {};
    const msg = p.message || 'the server answered HTTP ' + status;
    const m = /^([a-z_]+)/.exec(p.message || '');
    const field = m && EDIT_FIELDS.includes(m[1]) ? m[1] : null;
    if (!field) {
      $('edit-error').textContent = 'Not saved: ' + msg;
      $('edit-error').hidden = false;
      return;
    }
    const e = $('eerr-' + field);
    e.textContent = msg;
    e.hidden = false;
    editInput(field).setAttribute('aria-invalid', 'true');
    editInput(field).focus();
  }

  async function onEditSave(ev) {
    ev.preventDefault();
    clearEditErrors();
    const body = readEdit();
    if (Object.keys(body).length === 1) {  // only the port: nothing was changed
      $('edit-dialog').close();
      notice('Nothing changed on port ' + body.port + '.');
      return;
    }
    $('edit-save').disabled = true;
    try {
      const r = await api('POST', '/api/mapping/update', body);
      if (r.status === 401) {
        $('edit-dialog').close();
        handleUnauthorized();
      } else if (r.status === 200 && r.payload && r.payload.success) {
        $('edit-dialog').close();
        notice('Mapping on port ' + body.port + ' updated.');
        loop();
      } else {
        showEditError(r.payload, r.status);
      }
    } catch (e) {
      $('edit-error').textContent = 'Not saved: ' + e.message + '.';
      $('edit-error').hidden = false;
    } finally {
      $('edit-save').disabled = false;
    }
  }

  async function toggleEnabled(port) {
    const row = state.rows.get(String(port));
    if (!row) return;
    const enable = row.m.enabled === false;
    const what = enable ? 'enabled' : 'disabled';
    try {
      const r = await api('POST', '/api/mapping/update', { port, enabled: enable });
      if (r.status === 401) handleUnauthorized();
      else if (r.status === 200 && r.payload && r.payload.success) notice('Mapping on port ' + port + ' ' + what + '.');
      else notice('Port ' + port + ' not ' + what + ': ' + ((r.payload && r.payload.message) || 'HTTP ' + r.status), true);
    } catch (e) {
      notice('Port ' + port + ' not ' + what + ': ' + e.message + '.', true);
    }
    loop();
  }

  function onEditClose() {
    state.editing = null;
    const back = state.returnFocus;
    state.returnFocus = null;
    if (back && document.contains(back)) back.focus();
  }

  /* ---------------------------------------------------------------- remove */

  function askRemove(port) {
    const dlg = $('confirm-dialog');
    state.pendingRemove = port;
    state.returnFocus = document.activeElement;
    $('confirm-text').textContent = 'Remove the mapping on port ' + port +
      '? Its listener stops and its live connections are closed.';
    dlg.showModal();
    $('confirm-no').focus();
  }

  function onDialogClose() {
    state.pendingRemove = null;
    const back = state.returnFocus;
    state.returnFocus = null;
    if (back && document.contains(back)) back.focus();
    else $('mappings').focus();
  }

  async function doRemove() {
    const port = state.pendingRemove;
    state.returnFocus = null; /* the row's button is about to go: focus lands on the table */
    $('confirm-dialog').close();
    if (port === null) return;
    try {
      const r = await api('POST', '/api/mapping/remove', { port });
      if (r.status === 401) handleUnauthorized();
      else if (r.status === 200 && r.payload && r.payload.success) notice('Mapping on port ' + port + ' removed.');
      else notice('Port ' + port + ' not removed: ' + ((r.payload && r.payload.message) || 'HTTP ' + r.status), true);
    } catch (e) {
      notice('Port ' + port + ' not removed: ' + e.message + '.', true);
    }
    loop();
  }

  /* ---------------------------------------------------------------- token form */

  function onTokenSubmit(ev) {
    ev.preventDefault();
    const t = $('token-input').value.trim();
    if (!t) {
      $('token-input').focus();
      return;
    }
    setToken(t);
    $('token-input').value = '';
    setConn('connecting');
    loop();
  }

  function onTokenChange() {
    setToken('');
    clearData();
    setConn('needs-token');
  }

  /* ---------------------------------------------------------------- start */

  function start() {
    $('create-form').addEventListener('submit', onCreate);
    $('f-mode-direct').addEventListener('change', syncMode);
    $('f-mode-tunnel').addEventListener('change', syncMode);
    $('filter').addEventListener('input', applyFilter);
    $('confirm-yes').addEventListener('click', doRemove);
    $('confirm-no').addEventListener('click', () => $('confirm-dialog').close());
    $('confirm-dialog').addEventListener('close', onDialogClose);
    $('token-form').addEventListener('submit', onTokenSubmit);
    $('edit-form').addEventListener('submit', onEditSave);
    $('edit-cancel').addEventListener('click', () => $('edit-dialog').close());
    $('edit-dialog').addEventListener('close', onEditClose);
    $('token-change').addEventListener('click', onTokenChange);
    $('client-form').addEventListener('submit', onClientCreate);
    $('client-token-copy').addEventListener('click', copyToken);
    $('client-token-done').addEventListener('click', hideToken);
    $('client-dialog-yes').addEventListener('click', doClientAction);
    $('client-dialog-no').addEventListener('click', () => $('client-dialog').close());
    $('client-dialog').addEventListener('close', onClientDialogClose);
    syncMode();
    updateEmpty();
    loop();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

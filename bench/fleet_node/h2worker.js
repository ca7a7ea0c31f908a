'use strict';
/*
 * One process of the scale bench's fake ADS client fleet on Node's core `http2` module, without
 * grpc-js: the same clients, subscriptions, ACKs and records as worker.js (and bench/fleet.py's
 * Python worker), with gRPC's framing and the xDS envelopes done by hand. Started and driven by
 * bench/fleet.py's NodeWorker (impl "h2"), with the same spec and the same stdin/stdout commands
 * as worker.js (see its header).
 *
 * Why: the fleet runs on the bench's 2 cores beside the control plane, so its CPU per weight
 * change is a bench artefact taken from the control plane. A CPU profile of worker.js over the
 * changes of a 10,000-stream --scale run (GRAYLANE_FLEET_NODE_PROFILE) put about three quarters
 * of its main thread in JS layers: Node's buffers, streams and events (~26 %), grpc-js (~17 %),
 * the garbage collector (~14 %), our JS (~13 %) and protobufjs (~4 %), the rest native (nghttp2,
 * socket writes). Here a response costs one pass over its top-level fields (type_url,
 * version_info, nonce, each resource's bytes) and a request is a few bytes written by hand; a
 * resource's content is still decoded with protobufjs, once per distinct bytes per process (as
 * worker.js and fleet.py do). Measured at 10,000 streams: 1,140 ms of worker CPU per change
 * against 1,710-1,980 ms for worker.js; the per-frame JS of Node's http2 and the collector
 * remain, so bench/fleet_c/worker.c goes further (300-470 ms).
 *
 * Wire behaviour a gRPC server sees: one HTTP/2 connection per `streams_per_channel` clients,
 * POSTs with content-type application/grpc and te: trailers, identity encoding only (the server
 * never compresses, so every message is a plain 5-byte-prefixed one). A call's end is its
 * grpc-status (trailers, or headers for a trailers-only answer); a stream reset or a lost
 * connection maps to the code grpc-js would report (CANCELLED, RESOURCE_EXHAUSTED, UNAVAILABLE,
 * INTERNAL).
 */

const fs = require('fs');
const http2 = require('http2');
const readline = require('readline');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

const CLUSTER = 'type.googleapis.com/envoy.config.cluster.v3.Cluster';
const ENDPOINT = 'type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment';
const LISTENER = 'type.googleapis.com/envoy.config.listener.v3.Listener';
const ROUTE = 'type.googleapis.com/envoy.config.route.v3.RouteConfiguration';
const SCOPED_ROUTE = 'type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration';
const ROUTE_CONFIG_PREFIX = 'graylane/'; // graylane.xds.view.route_config_name(service)
const SOTW_METHOD = '/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources';
const DELTA_METHOD = '/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources';
const RECONNECT_DELAY_MS = 1000;
const EDS_TYPE = 3; // envoy.config.cluster.v3.Cluster.DiscoveryType.EDS
const MAX_MESSAGE = 64 * 1024 * 1024; // as worker.js's grpc.max_receive_message_length

const spec = JSON.parse(process.argv[2]);
process.title = 'graylane-fleet-h2';

const root = protobuf.Root.fromDescriptor(descriptor.FileDescriptorSet.decode(fs.readFileSync(spec.descriptors)));
const Cluster = root.lookupType('envoy.config.cluster.v3.Cluster');
const RouteConfiguration = root.lookupType('envoy.config.route.v3.RouteConfiguration');
const ScopedRouteConfiguration = root.lookupType('envoy.config.route.v3.ScopedRouteConfiguration');

const CODE_NAMES = [
  'OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS',
  'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE',
  'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED',
];
const C = http2.constants;

// ------------------------------------------------------------------ protobuf by hand

/** Reads a varint at `pos` of `buf`: [value, next position] (values up to 2^53). */
function varint(buf, pos) {
  let b = buf[pos++];
  if (b < 0x80) return [b, pos];
  let value = b & 0x7f;
  let scale = 0x80;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    b = buf[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 0x80;
  }
}

/** Calls `visit(field, wireType, start, end)` for each top-level field of a message in `buf`
 * (for length-delimited fields start/end bound the payload; the others are skipped). */
function fields(buf, visit) {
  let pos = 0;
  const end = buf.length;
  while (pos < end) {
    let key;
    [key, pos] = varint(buf, pos);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 2) {
      let len;
      [len, pos] = varint(buf, pos);
      if (pos + len > end) throw new Error('truncated field');
      visit(field, wire, pos, pos + len);
      pos += len;
    } else if (wire === 0) {
      [, pos] = varint(buf, pos);
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else {
      throw new Error(`wire type ${wire}`);
    }
  }
}

/** The bytes of an Any's `value` (field 2) inside `buf` (an empty buffer when absent). */
function anyValue(buf) {
  let value = buf.subarray(0, 0);
  fields(buf, (f, w, s, e) => {
    if (f === 2) value = buf.subarray(s, e);
  });
  return value;
}

/** A DiscoveryResponse's envelope: {type, version, nonce, resources: [Any value bytes]}. */
function sotwResponse(buf) {
  const out = { type: '', version: '', nonce: '', resources: [] };
  fields(buf, (f, w, s, e) => {
    if (f === 4) out.type = buf.latin1Slice(s, e);
    else if (f === 1) out.version = buf.utf8Slice(s, e);
    else if (f === 5) out.nonce = buf.utf8Slice(s, e);
    else if (f === 2) out.resources.push(anyValue(buf.subarray(s, e)));
  });
  return out;
}

/** A DeltaDiscoveryResponse's envelope: {type, nonce, resources: [{name, value}], removed: [name]}
 * (value: the Any's bytes, null when the Resource carries none). */
function deltaResponse(buf) {
  const out = { type: '', nonce: '', resources: [], removed: [] };
  fields(buf, (f, w, s, e) => {
    if (f === 4) out.type = buf.latin1Slice(s, e);
    else if (f === 5) out.nonce = buf.utf8Slice(s, e);
    else if (f === 6) out.removed.push(buf.utf8Slice(s, e));
    else if (f === 2) {
      const r = buf.subarray(s, e);
      const resource = { name: '', value: null };
      fields(r, (rf, rw, rs, re) => {
        if (rf === 3) resource.name = r.utf8Slice(rs, re);
        else if (rf === 2) resource.value = anyValue(r.subarray(rs, re));
      });
      out.resources.push(resource);
    }
  });
  return out;
}

/** Writes a message of length-delimited fields, [[field, string or Buffer], ...] (empty strings are
 * left out, as proto3 serialisers do), as a Buffer. */
function message(parts) {
  const chunks = [];
  for (const [field, v] of parts) {
    if (v === '' || v === undefined || v === null) continue;
    const bytes = typeof v === 'string' ? Buffer.from(v, 'utf8') : v;
    chunks.push(lengthKey(field, bytes.length), bytes);
  }
  return Buffer.concat(chunks);
}

function lengthKey(field, len) {
  const out = [field * 8 + 2];
  for (let n = len; ; ) {
    if (n < 0x80) {
      out.push(n);
      break;
    }
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 0x80);
  }
  return Buffer.from(out);
}

/** gRPC's length-prefixed framing of one message (uncompressed). */
function frame(msg) {
  const out = Buffer.allocUnsafe(5 + msg.length);
  out[0] = 0;
  out.writeUInt32BE(msg.length, 1);
  msg.copy(out, 5);
  return out;
}

// DiscoveryRequest: version_info 1, node 2, resource_names 3, type_url 4, response_nonce 5.
const sotwRequest = (type, version, nonce, names, node) =>
  Buffer.concat([message([[2, node], [4, type], [1, version], [5, nonce]]), names ? names.encoded : Buffer.alloc(0)]);
// DeltaDiscoveryRequest: node 1, type_url 2, subscribe 3, unsubscribe 4, response_nonce 6.
const deltaRequest = (type, nonce, subscribe, unsubscribe, node) =>
  message([[1, node], [2, type], [6, nonce], ...(subscribe || []).map((n) => [3, n]), ...(unsubscribe || []).map((n) => [4, n])]);

/** envoy.config.core.v3.Node {id 1, cluster 2, metadata 3: Struct {fields 1: map<string, Value
 * {string_value 3}>}}, as worker.js sends it. */
function encodeNode(index) {
  const value = message([[3, String(spec.listen_port)]]);
  const entry = message([[1, 'listen_port'], [2, value]]);
  const metadata = message([[1, entry]]);
  return message([[1, `fleet-${index}`], [2, 'graylane'], [3, metadata]]);
}

/** Names sorted, with a string key to compare whole sets by, and the set encoded once as a
 * DiscoveryRequest's resource_names (appended to an ACK's other fields: repeated fields concatenate). */
function sortedSet(names) {
  const sorted = [...names].sort();
  return { names: sorted, key: sorted.join('\n'), encoded: message(sorted.map((n) => [3, n])) };
}
const NO_NAMES = sortedSet([]);

// ------------------------------------------------------------------ what versions carry

/** A Buffer's content as a Map key (latin1: one char per byte, no decoding). */
const bytesKey = (buf) => buf.latin1Slice(0, buf.length);

/** What each resource version carries, decoded once per process (as worker.js's Decoded). */
class Decoded {
  constructor() {
    this.clusterSets = new Map(); // CDS version -> sorted set of EDS names
    this.scopeSets = new Map(); // SRDS version -> sorted set of route config names
    this.scopeTargets = new Map(); // scope bytes -> route config name
    this.weights = new Map(); // entry route config bytes -> weight
    this.entryRoute = ROUTE_CONFIG_PREFIX + spec.entry;
    // A serialized RouteConfiguration starts with its name (field 1): the entry's is found
    // without decoding the others.
    const name = Buffer.from(this.entryRoute);
    this.entryPrefix = Buffer.concat([Buffer.from([0x0a, name.length]), name]);
  }

  edsNames(version, resources) {
    let found = this.clusterSets.get(version);
    if (found === undefined) {
      const names = [];
      for (const value of resources) {
        const c = Cluster.decode(value);
        if (c.type === EDS_TYPE) names.push((c.eds_cluster_config && c.eds_cluster_config.service_name) || c.name);
      }
      found = sortedSet(names);
      this.clusterSets.set(version, found);
    }
    return found;
  }

  routeConfigs(version, resources) {
    let found = this.scopeSets.get(version);
    if (found === undefined) {
      found = sortedSet(resources.map((value) => this.routeConfigOfScope(value)));
      this.scopeSets.set(version, found);
    }
    return found;
  }

  routeConfigOfScope(value) {
    const key = bytesKey(value);
    let found = this.scopeTargets.get(key);
    if (found === undefined) {
      found = ScopedRouteConfiguration.decode(value).route_configuration_name;
      this.scopeTargets.set(key, found);
    }
    return found;
  }

  isEntry(value) {
    const p = this.entryPrefix;
    return value.length >= p.length && value.compare(p, 0, p.length, 0, p.length) === 0;
  }

  weight(value) {
    const key = bytesKey(value);
    let found = this.weights.get(key);
    if (found === undefined) {
      const rc = RouteConfiguration.decode(value);
      found = 0;
      for (const vh of rc.virtual_hosts) {
        if (vh.name !== spec.entry) continue;
        for (const r of vh.routes) {
          const clusters = (r.route && r.route.weighted_clusters && r.route.weighted_clusters.clusters) || [];
          for (const w of clusters) {
            if (w.name.endsWith(spec.lane_cluster_part)) found = w.weight ? w.weight.value : 0;
          }
          if (found) break;
        }
      }
      this.weights.set(key, found);
    }
    return found;
  }
}

class Client {
  constructor(index, delta) {
    this.index = index;
    this.delta = delta;
    this.configured = false;
    this.connected = false;
    this.weight = -1;
    this.seen = new Map(); // weight -> epoch seconds first seen
    this.call = null;
    this.node = encodeNode(index); // on the first request of every stream
  }

  saw(weight) {
    this.weight = weight;
    this.configured = true;
    if (!this.seen.has(weight)) this.seen.set(weight, Date.now() / 1000);
  }
}

// ------------------------------------------------------------------ HTTP/2 and gRPC calls

/** One HTTP/2 connection shared by a group of clients, opened again on the next call once lost. */
class Channel {
  constructor() {
    this.session = null;
  }

  get() {
    const s = this.session;
    if (s !== null && !s.closed && !s.destroyed) return s;
    const session = http2.connect(`http://${spec.target}`, {
      // Large windows and frames: fewer WINDOW_UPDATE frames and fewer data callbacks per
      // response; the memory cap (MB) is a guard, not a limit a sane run reaches.
      settings: { initialWindowSize: 4 * 1024 * 1024, maxFrameSize: 1024 * 1024, enablePush: false },
      maxSessionMemory: 1024,
    });
    session.on('error', () => {}); // each stream reports its own end; a session error ends them all
    session.on('connect', () => session.setLocalWindowSize(64 * 1024 * 1024));
    this.session = session;
    return session;
  }

  close() {
    if (this.session !== null && !this.session.destroyed) this.session.destroy();
  }
}

/** What a stream reset means as a gRPC code (as grpc-js maps it). */
function resetCode(rst) {
  if (rst === C.NGHTTP2_REFUSED_STREAM) return 14; // UNAVAILABLE
  if (rst === C.NGHTTP2_CANCEL) return 1; // CANCELLED
  if (rst === C.NGHTTP2_ENHANCE_YOUR_CALM) return 8; // RESOURCE_EXHAUSTED
  if (rst === C.NGHTTP2_INADEQUATE_SECURITY) return 7; // PERMISSION_DENIED
  return 13; // INTERNAL
}

/** One ADS call on `channel`: `onMessage(bytes)` per response message, `ended({code, details})`
 * once. Returns {write(bytes), cancel()}, `bytes` being one or more framed messages. */
function openCall(channel, method, onMessage, ended) {
  let status = null; // {code, details} from grpc-status
  let done = false;
  let stream;
  const finish = (s) => {
    if (done) return;
    done = true;
    ended(s);
  };
  try {
    stream = channel.get().request(
      {
        ':method': 'POST',
        ':path': method,
        ':authority': spec.target,
        'content-type': 'application/grpc',
        te: 'trailers',
        'grpc-accept-encoding': 'identity',
        'user-agent': 'graylane-fleet-h2',
      },
      { endStream: false },
    );
  } catch (err) {
    setImmediate(() => finish({ code: 14, details: String(err.message || err) }));
    return { write() {}, cancel() {} };
  }
  const takeStatus = (headers) => {
    const code = headers['grpc-status'];
    if (code !== undefined && status === null) {
      let details = headers['grpc-message'] || '';
      try {
        details = decodeURIComponent(details);
      } catch (_) {
        // kept as sent
      }
      status = { code: Number(code), details };
    }
  };
  stream.on('response', takeStatus); // a trailers-only answer carries its status in the headers
  stream.on('trailers', takeStatus);
  // Framed messages: a message may span data events, and one event may carry several.
  let parts = [];
  let have = 0;
  let need = 5;
  stream.on('data', (chunk) => {
    if (done) return;
    if (parts.length === 0 && chunk.length >= need) {
      // The common case: whole messages in this chunk.
      if (consume(chunk)) return;
    } else {
      parts.push(chunk);
      have += chunk.length;
      if (have < need) return;
      const buf = Buffer.concat(parts, have);
      parts = [];
      have = 0;
      if (consume(buf)) return;
    }
  });
  const consume = (buf) => {
    let off = 0;
    while (buf.length - off >= 5) {
      const len = buf.readUInt32BE(off + 1);
      if (buf[off] !== 0 || len > MAX_MESSAGE) {
        status = { code: 13, details: buf[off] !== 0 ? 'compressed message' : 'message too large' };
        stream.close(C.NGHTTP2_CANCEL);
        return true;
      }
      if (buf.length - off - 5 < len) {
        need = 5 + len;
        break;
      }
      const msg = buf.subarray(off + 5, off + 5 + len);
      off += 5 + len;
      need = 5;
      try {
        onMessage(msg);
      } catch (err) {
        status = { code: 13, details: `bad response: ${err.message}` };
        stream.close(C.NGHTTP2_CANCEL);
        return true;
      }
    }
    if (off < buf.length) {
      parts = [buf.subarray(off)];
      have = buf.length - off;
      if (have >= 5) need = 5 + buf.readUInt32BE(off + 1);
    } else {
      need = 5;
    }
    return false;
  };
  stream.on('error', () => {}); // the end is read in 'close'
  stream.on('close', () => {
    if (status === null) {
      const rst = stream.rstCode;
      const session = stream.session;
      if (rst !== undefined && rst !== C.NGHTTP2_NO_ERROR) status = { code: resetCode(rst), details: `stream reset (${rst})` };
      else if (!session || session.destroyed || session.closed) status = { code: 14, details: 'connection lost' };
      else status = { code: 13, details: 'stream ended without a status' };
    }
    finish(status);
  });
  return {
    write: (bytes) => {
      if (!done && !stream.destroyed) stream.write(bytes);
    },
    cancel: () => {
      if (!stream.destroyed) stream.close(C.NGHTTP2_CANCEL);
    },
  };
}

// ------------------------------------------------------------------ the fleet

class Fleet {
  constructor() {
    this.decoded = new Decoded();
    this.clients = [];
    for (let i = 0; i < spec.count; i++) {
      const index = spec.first + i;
      this.clients.push(new Client(index, Boolean(spec.delta_every) && index % spec.delta_every === 0));
    }
    this.errors = 0;
    this.reconnects = 0;
    this.errorCodes = {};
    this.errorDetails = {};
    this.channels = [];
    this.stopping = false;
    this.startTimer = null;
  }

  start() {
    const perChannel = spec.streams_per_channel || 10;
    const rate = spec.connect_rate > 0 ? spec.connect_rate : Infinity;
    const t0 = Date.now();
    let next = 0;
    let channel = null;
    // Clients start at `connect_rate` per second, in ticks; each group of `perChannel` shares
    // one HTTP/2 connection.
    const tick = () => {
      this.startTimer = null;
      const due = Math.min(this.clients.length, Math.floor(((Date.now() - t0) / 1000) * rate) + 1);
      while (!this.stopping && next < due) {
        if (next % perChannel === 0) {
          channel = new Channel();
          this.channels.push(channel);
        }
        this.runClient(this.clients[next], channel);
        next++;
      }
      if (!this.stopping && next < this.clients.length) this.startTimer = setTimeout(tick, 5);
    };
    tick();
  }

  runClient(client, channel) {
    if (this.stopping) return;
    const ended = (status) => {
      client.connected = false;
      client.call = null;
      if (this.stopping) return;
      let code = 'ended';
      if (status.code !== 0) {
        code = CODE_NAMES[status.code] || String(status.code);
        const detail = `${code}: ${(status.details || '').slice(0, 80)}`;
        this.errorDetails[detail] = (this.errorDetails[detail] || 0) + 1;
      }
      this.errors++;
      this.errorCodes[code] = (this.errorCodes[code] || 0) + 1;
      this.reconnects++;
      setTimeout(() => this.runClient(client, channel), RECONNECT_DELAY_MS);
    };
    if (client.delta) this.delta(client, channel, ended);
    else this.sotw(client, channel, ended);
  }

  sotw(client, channel, ended) {
    let onResponse = null;
    const call = openCall(channel, SOTW_METHOD, (bytes) => onResponse(sotwResponse(bytes)), ended);
    client.call = call;
    // As Envoy opens a stream: CDS and LDS wildcard, the node on the first request.
    call.write(
      Buffer.concat([frame(sotwRequest(CLUSTER, '', '', null, client.node)), frame(sotwRequest(LISTENER, '', ''))]),
    );
    client.connected = true;
    // A parent's response names what its child subscribes to (CDS -> EDS, SRDS -> RDS);
    // per child, its latest response (version, nonce) and the names subscribed.
    const latest = { [ENDPOINT]: ['', ''], [ROUTE]: ['', ''] };
    const subscribed = { [ENDPOINT]: null, [ROUTE]: null };
    let srdsRequested = false;
    onResponse = (resp) => {
      const t = resp.type;
      if (t === CLUSTER || t === SCOPED_ROUTE) {
        const child = t === CLUSTER ? ENDPOINT : ROUTE;
        const set =
          t === CLUSTER
            ? this.decoded.edsNames(resp.version, resp.resources)
            : this.decoded.routeConfigs(resp.version, resp.resources);
        const ack = frame(sotwRequest(t, resp.version, resp.nonce));
        if (subscribed[child] === null || set.key !== subscribed[child].key) {
          subscribed[child] = set;
          const [version, nonce] = latest[child];
          call.write(Buffer.concat([ack, frame(sotwRequest(child, version, nonce, set))]));
        } else {
          call.write(ack);
        }
      } else if (t === ENDPOINT || t === ROUTE) {
        latest[t] = [resp.version, resp.nonce];
        call.write(frame(sotwRequest(t, resp.version, resp.nonce, subscribed[t] || NO_NAMES)));
        if (t === ROUTE) {
          for (const value of resp.resources) {
            if (this.decoded.isEntry(value)) client.saw(this.decoded.weight(value));
          }
        }
      } else if (t === LISTENER) {
        const ack = frame(sotwRequest(t, resp.version, resp.nonce));
        if (!srdsRequested) {
          // The listener's scoped routes subscribe to SRDS.
          srdsRequested = true;
          call.write(Buffer.concat([ack, frame(sotwRequest(SCOPED_ROUTE, '', ''))]));
        } else {
          call.write(ack);
        }
      }
    };
  }

  delta(client, channel, ended) {
    let onResponse = null;
    const call = openCall(channel, DELTA_METHOD, (bytes) => onResponse(deltaResponse(bytes)), ended);
    client.call = call;
    call.write(
      Buffer.concat([frame(deltaRequest(CLUSTER, '', null, null, client.node)), frame(deltaRequest(LISTENER, ''))]),
    );
    client.connected = true;
    const subscribed = new Set();
    const scopes = new Map(); // scope name -> the route config it names
    let edsStarted = false;
    let srdsStarted = false;
    onResponse = (resp) => {
      const t = resp.type;
      const out = [frame(deltaRequest(t, resp.nonce))];
      if (t === CLUSTER) {
        const added = resp.resources.map((r) => r.name).filter((n) => !subscribed.has(n));
        const gone = resp.removed.filter((n) => subscribed.has(n));
        for (const n of added) subscribed.add(n);
        for (const n of gone) subscribed.delete(n);
        if (added.length || gone.length || !edsStarted) {
          edsStarted = true;
          out.push(frame(deltaRequest(ENDPOINT, '', added, gone)));
        }
      } else if (t === LISTENER && !srdsStarted) {
        srdsStarted = true;
        out.push(frame(deltaRequest(SCOPED_ROUTE, ''))); // wildcard
      } else if (t === SCOPED_ROUTE) {
        const before = new Set(scopes.values());
        for (const r of resp.resources) scopes.set(r.name, this.decoded.routeConfigOfScope(r.value || Buffer.alloc(0)));
        for (const n of resp.removed) scopes.delete(n);
        const after = new Set(scopes.values());
        const sub = [...after].filter((n) => !before.has(n)).sort();
        const unsub = [...before].filter((n) => !after.has(n)).sort();
        if (sub.length || unsub.length) out.push(frame(deltaRequest(ROUTE, '', sub, unsub)));
      } else if (t === ROUTE) {
        for (const r of resp.resources) {
          if (r.name === this.decoded.entryRoute && r.value !== null) client.saw(this.decoded.weight(r.value));
        }
      }
      call.write(out.length === 1 ? out[0] : Buffer.concat(out));
    };
  }

  status() {
    let connected = 0;
    let configured = 0;
    for (const c of this.clients) {
      connected += c.connected ? 1 : 0;
      configured += c.configured ? 1 : 0;
    }
    const details = Object.entries(this.errorDetails)
      .sort((a, b) => b[1] - a[1])
      .slice(0, 5);
    return {
      connected,
      configured,
      errors: this.errors,
      reconnects: this.reconnects,
      error_codes: { ...this.errorCodes },
      error_details: Object.fromEntries(details),
    };
  }

  stop() {
    this.stopping = true;
    if (this.startTimer !== null) clearTimeout(this.startTimer);
    const final = this.status();
    for (const c of this.clients) {
      if (c.call !== null) c.call.cancel();
    }
    for (const ch of this.channels) ch.close();
    return final;
  }
}

const fleet = new Fleet();
fleet.start();

// GRAYLANE_FLEET_NODE_PROFILE=<dir>: a CPU profile of the changes phase only (from the first
// `missing`, which the bench asks only while a change spreads, to `stop`), into <dir>.
const profileDir = process.env.GRAYLANE_FLEET_NODE_PROFILE;
let profiler = null;
function profileStart() {
  if (!profileDir || profiler !== null) return;
  const inspector = require('inspector');
  profiler = new inspector.Session();
  profiler.connect();
  profiler.post('Profiler.enable', () => profiler.post('Profiler.start'));
}
function profileStop(then) {
  if (profiler === null) return then();
  profiler.post('Profiler.stop', (err, result) => {
    if (!err) fs.writeFileSync(`${profileDir}/fleet-h2-${spec.first}.cpuprofile`, JSON.stringify(result.profile));
    then();
  });
}

let stopped = false;
function answer(id, result) {
  process.stdout.write(JSON.stringify({ id, result }) + '\n');
}
function stop(id) {
  if (stopped) return;
  stopped = true;
  const final = fleet.stop();
  profileStop(() => {
    if (id !== null) {
      process.stdout.write(JSON.stringify({ id, result: final }) + '\n', () => process.exit(0));
    } else {
      process.exit(0);
    }
  });
}

const lines = readline.createInterface({ input: process.stdin, terminal: false });
lines.on('line', (line) => {
  if (!line.trim()) return;
  const [id, name, arg] = JSON.parse(line);
  if (name === 'status') answer(id, fleet.status());
  else if (name === 'seen') answer(id, fleet.clients.map((c) => (c.seen.has(arg) ? c.seen.get(arg) : null)));
  else if (name === 'missing') {
    profileStart();
    let n = 0;
    for (const c of fleet.clients) n += c.seen.has(arg) ? 0 : 1;
    answer(id, n);
  } else if (name === 'stop') stop(id);
  else answer(id, { error: `unknown command ${name}` });
});
lines.on('close', () => stop(null));

'use strict';
/*
 * One process of the scale bench's fake ADS client fleet, in Node: the drop-in counterpart of
 * bench/fleet.py's Python worker (same clients, same subscriptions, same records), started and
 * driven by fleet.py's NodeWorker. The fleet runs on the bench's own 2 cores beside the control
 * plane, so what it costs per weight change is a bench artefact; this worker exists to make
 * that artefact small (grpc-js and protobufjs instead of grpc.aio).
 *
 * Usage: node worker.js '<spec JSON>'
 *   spec: {target, first, count, delta_every, entry, lane_cluster_part, connect_rate,
 *          listen_port, streams_per_channel, descriptors}
 *   descriptors: a serialized google.protobuf.FileDescriptorSet holding the xDS and Envoy
 *   messages, written by fleet.py from the installed Python protos (one source of truth for
 *   field numbers: the same descriptors the control plane serialises with).
 *
 * Commands: one JSON array per line on stdin, `[id, name, arg?]`; each is answered, in order,
 * by one JSON line on stdout, `{"id": id, "result": ...}`:
 *   status          -> {connected, configured, errors, reconnects, error_codes, error_details}
 *   seen <weight>   -> per client, the epoch seconds it first saw the weight (null: not yet)
 *   missing <weight> -> how many clients have not seen it yet
 *   stop            -> the final status; the process then exits (also on stdin's end).
 */

const fs = require('fs');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
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

const spec = JSON.parse(process.argv[2]);
process.title = 'graylane-fleet-node';

const root = protobuf.Root.fromDescriptor(descriptor.FileDescriptorSet.decode(fs.readFileSync(spec.descriptors)));
const T = (name) => root.lookupType(name);
const Request = T('envoy.service.discovery.v3.DiscoveryRequest');
const Response = T('envoy.service.discovery.v3.DiscoveryResponse');
const DeltaRequest = T('envoy.service.discovery.v3.DeltaDiscoveryRequest');
const DeltaResponse = T('envoy.service.discovery.v3.DeltaDiscoveryResponse');
const Cluster = T('envoy.config.cluster.v3.Cluster');
const RouteConfiguration = T('envoy.config.route.v3.RouteConfiguration');
const ScopedRouteConfiguration = T('envoy.config.route.v3.ScopedRouteConfiguration');

// Calls go through grpc-js's channel-level Call (what its client stubs and interceptors sit on):
// messages in and out are bytes, encoded and decoded here, without the per-message layers of a
// stub's Node stream, which cost about as much CPU as the rest of a client's work.
const encodeSotw = (fields) => Buffer.from(Request.encode(fields).finish());
const encodeDelta = (fields) => Buffer.from(DeltaRequest.encode(fields).finish());

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A Buffer's content as a Map key (latin1: one char per byte, no decoding). */
const bytesKey = (buf) => buf.toString('latin1');

/** What each resource version carries, decoded once per process (as fleet.py's _Decoded). */
class Decoded {
  constructor() {
    this.clusterSets = new Map(); // CDS version -> {names, key}
    this.scopeSets = new Map(); // SRDS version -> {names, key}
    this.scopeTargets = new Map(); // scope bytes -> route config name
    this.weights = new Map(); // entry route config bytes -> weight
    this.entryRoute = ROUTE_CONFIG_PREFIX + spec.entry;
    // A serialized RouteConfiguration starts with its name (field 1): the entry's is found
    // without decoding the others.
    const name = Buffer.from(this.entryRoute);
    this.entryPrefix = Buffer.concat([Buffer.from([0x0a, name.length]), name]);
  }

  /** The EDS names a SotW CDS response's clusters ask for (cached by version). */
  edsNames(version, resources) {
    let found = this.clusterSets.get(version);
    if (found === undefined) {
      const names = [];
      for (const any of resources) {
        const c = Cluster.decode(any.value);
        if (c.type === EDS_TYPE) names.push((c.eds_cluster_config && c.eds_cluster_config.service_name) || c.name);
      }
      found = sortedSet(names);
      this.clusterSets.set(version, found);
    }
    return found;
  }

  /** The route configs a SotW SRDS response's scopes name (the whole set: SRDS is wildcard). */
  routeConfigs(version, resources) {
    let found = this.scopeSets.get(version);
    if (found === undefined) {
      found = sortedSet(resources.map((any) => this.routeConfigOfScope(any)));
      this.scopeSets.set(version, found);
    }
    return found;
  }

  routeConfigOfScope(any) {
    const key = bytesKey(any.value);
    let found = this.scopeTargets.get(key);
    if (found === undefined) {
      found = ScopedRouteConfiguration.decode(any.value).route_configuration_name;
      this.scopeTargets.set(key, found);
    }
    return found;
  }

  isEntry(any) {
    const v = any.value;
    return v.length >= this.entryPrefix.length && this.entryPrefix.equals(v.subarray(0, this.entryPrefix.length));
  }

  /** The lane's weight in the entry's route config (cached by its bytes), as fleet.py finds it. */
  weight(any) {
    const key = bytesKey(any.value);
    let found = this.weights.get(key);
    if (found === undefined) {
      const rc = RouteConfiguration.decode(any.value);
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

/** Names sorted, with a string key to compare whole sets by (fleet.py compares tuples), and the
 * set encoded once as a DiscoveryRequest's resource_names: a SotW ACK carries every name it
 * subscribes to, and appending these bytes to the rest of the ACK is the same message (repeated
 * fields concatenate) without encoding each name again per ACK. */
function sortedSet(names) {
  const sorted = [...names].sort();
  return { names: sorted, key: sorted.join('\n'), encoded: encodeSotw({ resource_names: sorted }) };
}
const NO_NAMES = sortedSet([]);

class Client {
  constructor(index, delta) {
    this.index = index;
    this.delta = delta;
    this.configured = false;
    this.connected = false;
    this.weight = -1;
    this.seen = new Map(); // weight -> epoch seconds first seen
    this.call = null;
    // The node goes on the first request of every stream: encoded once.
    this.node = {
      id: `fleet-${index}`,
      cluster: 'graylane',
      // protobufjs loads a map field from descriptors as its repeated entry message.
      metadata: { fields: [{ key: 'listen_port', value: { string_value: String(spec.listen_port) } }] },
    };
  }

  saw(weight) {
    this.weight = weight;
    this.configured = true;
    // Date.now(): the system clock Python's time.time() reads (ms resolution is enough for
    // change latencies of tens to thousands of ms).
    if (!this.seen.has(weight)) this.seen.set(weight, Date.now() / 1000);
  }
}

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
    // Clients start at `connect_rate` per second, in ticks (a timer per client would be late
    // anyway at these rates); each group of `perChannel` shares one HTTP/2 connection.
    const tick = () => {
      this.startTimer = null;
      const due = Math.min(this.clients.length, Math.floor(((Date.now() - t0) / 1000) * rate) + 1);
      while (!this.stopping && next < due) {
        if (next % perChannel === 0) {
          channel = new grpc.Channel(spec.target, grpc.credentials.createInsecure(), {
            'grpc.max_receive_message_length': 64 * 1024 * 1024,
            // Its own connection, not the process-wide pool's shared one.
            'grpc.use_local_subchannel_pool': 1,
            // Per-call bookkeeping an ADS client does without (Envoy neither retries a stream's
            // messages nor keeps channelz): each costs CPU on every message or call here.
            'grpc.enable_retries': 0,
            'grpc.enable_channelz': 0,
          });
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
      if (this.stopping) return;
      let code = 'ended';
      if (status.code !== grpc.status.OK) {
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

  /** One ADS call: `onMessage(bytes)` per response; `ended(status)` once. */
  open(client, channel, method, onMessage, ended) {
    const call = channel.createCall(method, Infinity, null, null, grpc.propagate.DEFAULTS);
    let done = false;
    call.start(new grpc.Metadata(), {
      onReceiveMetadata() {},
      onReceiveMessage(bytes) {
        call.startRead(); // one response is delivered per startRead
        if (!done) onMessage(bytes);
      },
      onReceiveStatus(status) {
        if (done) return;
        done = true;
        client.call = null;
        ended(status);
      },
    });
    call.startRead();
    // One message in flight at a time, the next sent from the previous one's callback: the call
    // holds a single message until it is under way (a second would replace the first).
    const queue = [];
    let writing = false;
    const sent = () => {
      if (queue.length && !done) call.sendMessageWithContext({ callback: sent }, queue.shift());
      else writing = false;
    };
    const stream = {
      write: (bytes) => {
        if (writing) queue.push(bytes);
        else {
          writing = true;
          call.sendMessageWithContext({ callback: sent }, bytes);
        }
      },
      cancel: () => call.cancelWithStatus(grpc.status.CANCELLED, 'fleet stopped'),
    };
    client.call = stream;
    return stream;
  }

  sotw(client, channel, ended) {
    const call = this.open(client, channel, SOTW_METHOD, (bytes) => onResponse(Response.decode(bytes)), ended);
    // As Envoy opens a stream: CDS and LDS wildcard, the node on the first request.
    call.write(encodeSotw({ node: client.node, type_url: CLUSTER }));
    call.write(encodeSotw({ type_url: LISTENER }));
    client.connected = true;
    // A parent's response names what its child subscribes to (CDS -> EDS, SRDS -> RDS);
    // per child, its latest response (version, nonce) and the names subscribed.
    const latest = { [ENDPOINT]: ['', ''], [ROUTE]: ['', ''] };
    const subscribed = { [ENDPOINT]: null, [ROUTE]: null };
    let srdsRequested = false;
    const onResponse = (resp) => {
      const t = resp.type_url;
      const ack = { type_url: t, version_info: resp.version_info, response_nonce: resp.nonce };
      if (t === CLUSTER || t === SCOPED_ROUTE) {
        const child = t === CLUSTER ? ENDPOINT : ROUTE;
        const set =
          t === CLUSTER
            ? this.decoded.edsNames(resp.version_info, resp.resources)
            : this.decoded.routeConfigs(resp.version_info, resp.resources);
        call.write(encodeSotw(ack));
        if (subscribed[child] === null || set.key !== subscribed[child].key) {
          subscribed[child] = set;
          const [version, nonce] = latest[child];
          const head = encodeSotw({ type_url: child, version_info: version, response_nonce: nonce });
          call.write(Buffer.concat([head, set.encoded]));
        }
      } else if (t === ENDPOINT || t === ROUTE) {
        latest[t] = [resp.version_info, resp.nonce];
        call.write(Buffer.concat([encodeSotw(ack), (subscribed[t] || NO_NAMES).encoded]));
        if (t === ROUTE) {
          for (const any of resp.resources) {
            if (this.decoded.isEntry(any)) client.saw(this.decoded.weight(any));
          }
        }
      } else if (t === LISTENER) {
        call.write(encodeSotw(ack));
        if (!srdsRequested) {
          // The listener's scoped routes subscribe to SRDS.
          srdsRequested = true;
          call.write(encodeSotw({ type_url: SCOPED_ROUTE }));
        }
      }
    };
  }

  delta(client, channel, ended) {
    const call = this.open(client, channel, DELTA_METHOD, (bytes) => onResponse(DeltaResponse.decode(bytes)), ended);
    call.write(encodeDelta({ node: client.node, type_url: CLUSTER }));
    call.write(encodeDelta({ type_url: LISTENER }));
    client.connected = true;
    const subscribed = new Set();
    const scopes = new Map(); // scope name -> the route config it names
    let edsStarted = false;
    let srdsStarted = false;
    const onResponse = (resp) => {
      const t = resp.type_url;
      call.write(encodeDelta({ type_url: t, response_nonce: resp.nonce }));
      if (t === CLUSTER) {
        const added = resp.resources.map((r) => r.name).filter((n) => !subscribed.has(n));
        const gone = resp.removed_resources.filter((n) => subscribed.has(n));
        for (const n of added) subscribed.add(n);
        for (const n of gone) subscribed.delete(n);
        if (added.length || gone.length || !edsStarted) {
          edsStarted = true;
          call.write(encodeDelta({ type_url: ENDPOINT, resource_names_subscribe: added, resource_names_unsubscribe: gone }));
        }
      } else if (t === LISTENER && !srdsStarted) {
        srdsStarted = true;
        call.write(encodeDelta({ type_url: SCOPED_ROUTE })); // wildcard
      } else if (t === SCOPED_ROUTE) {
        const before = new Set(scopes.values());
        for (const r of resp.resources) scopes.set(r.name, this.decoded.routeConfigOfScope(r.resource));
        for (const n of resp.removed_resources) scopes.delete(n);
        const after = new Set(scopes.values());
        const sub = [...after].filter((n) => !before.has(n)).sort();
        const unsub = [...before].filter((n) => !after.has(n)).sort();
        if (sub.length || unsub.length) {
          call.write(encodeDelta({ type_url: ROUTE, resource_names_subscribe: sub, resource_names_unsubscribe: unsub }));
        }
      } else if (t === ROUTE) {
        for (const r of resp.resources) {
          if (r.name === this.decoded.entryRoute && r.resource) client.saw(this.decoded.weight(r.resource));
        }
      }
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
    if (!err) fs.writeFileSync(`${profileDir}/fleet-${spec.first}.cpuprofile`, JSON.stringify(result.profile));
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
      // Exit once the answer is flushed to the pipe.
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
// The parent went away (or closed our stdin): stop rather than linger.
lines.on('close', () => stop(null));

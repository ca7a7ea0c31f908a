/*
 * One process of the scale bench's fake ADS client fleet in C: libnghttp2 for HTTP/2, epoll,
 * gRPC's 5-byte framing and a small protobuf reader/writer by hand. The same clients,
 * subscriptions, ACKs and records as bench/fleet_node/worker.js and bench/fleet.py's Python
 * worker; driven by bench/fleet.py's CWorker with the same stdin/stdout JSON commands:
 *   [id, "status"] / [id, "seen", w] / [id, "missing", w] / [id, "stop"]
 * each answered by one line {"id": id, "result": ...} (see worker.js's header).
 *
 * Why C: the fleet runs on the bench's 2 cores beside the control plane, so its CPU per weight
 * change is a bench artefact taken from the control plane; Node's http2 module still pays a JS
 * callback per frame and per stream event, here a response costs one pass over its envelope.
 *
 * Usage: graylane-fleet-c HOST PORT FIRST COUNT DELTA_EVERY ENTRY LANE_CLUSTER_PART
 *                         CONNECT_RATE LISTEN_PORT STREAMS_PER_CHANNEL
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CLUSTER "type.googleapis.com/envoy.config.cluster.v3.Cluster"
#define ENDPOINT "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#define LISTENER "type.googleapis.com/envoy.config.listener.v3.Listener"
#define ROUTE "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#define SCOPED_ROUTE "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
#define SOTW_METHOD "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
#define DELTA_METHOD "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
#define RECONNECT_DELAY 1.0
#define EDS_TYPE 3 /* envoy.config.cluster.v3.Cluster.DiscoveryType.EDS */
#define MAX_MESSAGE (64u * 1024 * 1024)

enum { T_OTHER, T_CLUSTER, T_ENDPOINT, T_LISTENER, T_ROUTE, T_SCOPED };
static const char *TYPE_URLS[] = {"", CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE};
static const char *CODE_NAMES[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

static struct {
  char host[64];
  int port;
  int first, count, delta_every;
  const char *entry, *lane_part;
  double rate;
  int listen_port, per_channel;
  char authority[96];
} spec;

static void die(const char *what) {
  fprintf(stderr, "graylane-fleet-c: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) die("malloc");
  return p;
}

static void *xrealloc(void *p, size_t n) {
  p = realloc(p, n ? n : 1);
  if (!p) die("realloc");
  return p;
}

static char *xstrndup(const void *s, size_t n) {
  char *p = xmalloc(n + 1);
  memcpy(p, s, n);
  p[n] = 0;
  return p;
}

static double now_wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------ byte buffers */

typedef struct {
  uint8_t *p;
  size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
  if (b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  b->p = xrealloc(b->p, cap);
  b->cap = cap;
}

static void buf_add(buf_t *b, const void *p, size_t n) {
  buf_reserve(b, n);
  memcpy(b->p + b->len, p, n);
  b->len += n;
}

static void buf_free(buf_t *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* ------------------------------------------------------------------ hash maps keyed by bytes */

typedef struct {
  uint8_t *key; /* NULL: empty; TOMB: removed */
  size_t klen;
  uint64_t hash;
  void *val;
} slot_t;

typedef struct {
  slot_t *slots;
  size_t cap, used, live; /* used counts tombstones too */
} map_t;

static uint8_t TOMB_BYTE;
#define TOMB (&TOMB_BYTE)

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    h = (h ^ v) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
    p += 8;
    n -= 8;
  }
  uint64_t v = 0;
  memcpy(&v, p, n);
  h = (h ^ v) * 0xc4ceb9fe1a85ec53ull;
  return h ^ (h >> 29);
}

static slot_t *map_find(map_t *m, const void *key, size_t klen, uint64_t h) {
  if (!m->cap) return NULL;
  for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    slot_t *s = &m->slots[i];
    if (s->key == NULL) return NULL;
    if (s->key != TOMB && s->hash == h && s->klen == klen && memcmp(s->key, key, klen) == 0) return s;
  }
}

static slot_t *map_get(map_t *m, const void *key, size_t klen) {
  return map_find(m, key, klen, hash_bytes(key, klen));
}

static void map_insert_slot(map_t *m, uint8_t *key, size_t klen, uint64_t h, void *val) {
  for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    slot_t *s = &m->slots[i];
    if (s->key == NULL || s->key == TOMB) {
      if (s->key == NULL) m->used++;
      s->key = key;
      s->klen = klen;
      s->hash = h;
      s->val = val;
      m->live++;
      return;
    }
  }
}

static void map_grow(map_t *m) {
  slot_t *old = m->slots;
  size_t oldcap = m->cap;
  m->cap = oldcap ? oldcap * 2 : 16;
  while (m->live * 2 >= m->cap) m->cap *= 2;
  m->slots = calloc(m->cap, sizeof(slot_t));
  if (!m->slots) die("calloc");
  m->used = m->live = 0;
  for (size_t i = 0; i < oldcap; i++)
    if (old[i].key != NULL && old[i].key != TOMB) map_insert_slot(m, old[i].key, old[i].klen, old[i].hash, old[i].val);
  free(old);
}

/* Puts key -> val (the key copied, NUL-terminated); returns the slot. */
static slot_t *map_put(map_t *m, const void *key, size_t klen, void *val) {
  uint64_t h = hash_bytes(key, klen);
  slot_t *s = map_find(m, key, klen, h);
  if (s) {
    s->val = val;
    return s;
  }
  if ((m->used + 1) * 4 >= m->cap * 3) map_grow(m);
  map_insert_slot(m, (uint8_t *)xstrndup(key, klen), klen, h, val);
  return map_find(m, key, klen, h);
}

static int map_del(map_t *m, const void *key, size_t klen) {
  slot_t *s = map_get(m, key, klen);
  if (!s) return 0;
  free(s->key);
  s->key = TOMB;
  m->live--;
  return 1;
}

static void map_clear(map_t *m) {
  for (size_t i = 0; i < m->cap; i++)
    if (m->slots[i].key != NULL && m->slots[i].key != TOMB) free(m->slots[i].key);
  free(m->slots);
  memset(m, 0, sizeof(*m));
}

/* One process-wide copy of each string: pointers compare as the strings do. */
static map_t interned;
static const char *intern(const void *s, size_t n) {
  slot_t *slot = map_get(&interned, s, n);
  if (!slot) slot = map_put(&interned, s, n, NULL);
  return (const char *)slot->key;
}

/* ------------------------------------------------------------------ protobuf by hand */

typedef struct {
  const uint8_t *p, *end;
} pb_t;

/* Next field: 1 with its number, wire type and (length-delimited) payload or varint; 0 at the
 * end; -1 on malformed input. */
static int pb_next(pb_t *r, uint32_t *field, int *wire, const uint8_t **data, size_t *len, uint64_t *value) {
  if (r->p >= r->end) return 0;
  uint64_t v = 0;
  int shift = 0;
  uint64_t key = 0;
  for (;;) {
    if (r->p >= r->end || shift > 63) return -1;
    uint8_t b = *r->p++;
    key |= (uint64_t)(b & 0x7f) << shift;
    if (b < 0x80) break;
    shift += 7;
  }
  *field = (uint32_t)(key >> 3);
  *wire = key & 7;
  switch (*wire) {
    case 0:
    case 2:
      shift = 0;
      for (;;) {
        if (r->p >= r->end || shift > 63) return -1;
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (b < 0x80) break;
        shift += 7;
      }
      if (*wire == 0) {
        *value = v;
        return 1;
      }
      if (v > (uint64_t)(r->end - r->p)) return -1;
      *data = r->p;
      *len = v;
      r->p += v;
      return 1;
    case 1:
      if (r->end - r->p < 8) return -1;
      r->p += 8;
      return 1;
    case 5:
      if (r->end - r->p < 4) return -1;
      r->p += 4;
      return 1;
    default:
      return -1;
  }
}

#define PB_EACH(data_, len_)                                     \
  pb_t r_ = {(data_), (data_) + (len_)};                         \
  uint32_t f;                                                    \
  int w, rc_;                                                    \
  const uint8_t *d = NULL;                                       \
  size_t n = 0;                                                  \
  uint64_t v = 0;                                                \
  while ((rc_ = pb_next(&r_, &f, &w, &d, &n, &v)) == 1)

static void pb_key_len(buf_t *b, uint32_t field, size_t len) {
  uint8_t tmp[16];
  int i = 0;
  tmp[i++] = (uint8_t)(field << 3 | 2);
  while (len >= 0x80) {
    tmp[i++] = (uint8_t)(len | 0x80);
    len >>= 7;
  }
  tmp[i++] = (uint8_t)len;
  buf_add(b, tmp, i);
}

/* A length-delimited field, left out when empty (as proto3 serialisers do for strings). */
static void pb_bytes(buf_t *b, uint32_t field, const void *p, size_t n) {
  if (!n) return;
  pb_key_len(b, field, n);
  buf_add(b, p, n);
}

static void pb_str(buf_t *b, uint32_t field, const char *s) {
  if (s) pb_bytes(b, field, s, strlen(s));
}

/* gRPC framing: frame_begin reserves the 5-byte prefix, frame_end fills it in. */
static size_t frame_begin(buf_t *b) {
  buf_reserve(b, 5);
  size_t at = b->len;
  memset(b->p + at, 0, 5);
  b->len += 5;
  return at;
}

static void frame_end(buf_t *b, size_t at) {
  uint32_t n = htonl((uint32_t)(b->len - at - 5));
  memcpy(b->p + at + 1, &n, 4);
}

/* ------------------------------------------------------------------ what versions carry */

/* A sorted set of names, interned by content (pointers compare as sets do), with its encoding
 * as a DiscoveryRequest's resource_names (appended to an ACK: repeated fields concatenate). */
typedef struct {
  int n;
  const char **names;
  buf_t encoded;
} nameset_t;

static map_t namesets;             /* joined names -> nameset_t* */
static map_t cluster_sets;         /* CDS version -> nameset_t* */
static map_t scope_sets;           /* SRDS version -> nameset_t* */
static map_t scope_targets;        /* scope bytes -> interned route config name */
static map_t weights;              /* entry route config bytes -> weight + 1 */
static buf_t entry_prefix;         /* a serialized RouteConfiguration named graylane/<entry> starts so */
static const char *entry_route;    /* interned "graylane/<entry>" */
static nameset_t *NO_NAMES;

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static nameset_t *nameset_of(const char **names, int n) {
  if (n) qsort(names, n, sizeof(*names), cmp_str);
  buf_t key = {0};
  for (int i = 0; i < n; i++) {
    buf_add(&key, names[i], strlen(names[i]));
    buf_add(&key, "\n", 1);
  }
  slot_t *s = map_get(&namesets, key.p ? key.p : (uint8_t *)"", key.len);
  if (!s) {
    nameset_t *set = xmalloc(sizeof(*set));
    memset(set, 0, sizeof(*set));
    set->n = n;
    set->names = xmalloc(sizeof(char *) * n);
    if (n) memcpy(set->names, names, sizeof(char *) * n);
    for (int i = 0; i < n; i++) pb_str(&set->encoded, 3, set->names[i]);
    s = map_put(&namesets, key.p ? key.p : (uint8_t *)"", key.len, set);
  }
  buf_free(&key);
  return s->val;
}

static const char *scope_target(const uint8_t *p, size_t len) {
  if (p == NULL) p = (const uint8_t *)"";
  slot_t *s = map_get(&scope_targets, p, len);
  if (s) return s->val;
  const char *name = intern("", 0);
  PB_EACH(p, len) {
    if (f == 2 && w == 2) name = intern(d, n);
  }
  map_put(&scope_targets, p, len, (void *)name);
  return name;
}

typedef struct {
  const uint8_t *p;
  size_t len;
} span_t;

static nameset_t *eds_names(const char *version, span_t *res, int nres) {
  slot_t *s = map_get(&cluster_sets, version, strlen(version));
  if (s) return s->val;
  const char **names = xmalloc(sizeof(char *) * (nres + 1));
  int k = 0;
  for (int i = 0; i < nres; i++) {
    const uint8_t *name = NULL, *service = NULL;
    size_t name_len = 0, service_len = 0;
    uint64_t type = 0;
    PB_EACH(res[i].p, res[i].len) {
      if (f == 1 && w == 2) name = d, name_len = n;
      else if (f == 2 && w == 0) type = v;
      else if (f == 3 && w == 2) {
        PB_EACH(d, n) {
          if (f == 2 && w == 2) service = d, service_len = n;
        }
      }
    }
    if (type == EDS_TYPE) names[k++] = service_len ? intern(service, service_len) : intern(name ? name : (uint8_t *)"", name_len);
  }
  nameset_t *set = nameset_of(names, k);
  free(names);
  map_put(&cluster_sets, version, strlen(version), set);
  return set;
}

static nameset_t *route_configs(const char *version, span_t *res, int nres) {
  slot_t *s = map_get(&scope_sets, version, strlen(version));
  if (s) return s->val;
  const char **names = xmalloc(sizeof(char *) * (nres + 1));
  for (int i = 0; i < nres; i++) names[i] = scope_target(res[i].p, res[i].len);
  nameset_t *set = nameset_of(names, nres);
  free(names);
  map_put(&scope_sets, version, strlen(version), set);
  return set;
}

static int is_entry(const uint8_t *p, size_t len) {
  return len >= entry_prefix.len && memcmp(p, entry_prefix.p, entry_prefix.len) == 0;
}

static int ends_with(const uint8_t *p, size_t n, const char *suffix) {
  size_t k = strlen(suffix);
  return n >= k && memcmp(p + n - k, suffix, k) == 0;
}

/* The lane's weight in the entry's route config, as worker.js finds it (cached by its bytes). */
static int route_weight(const uint8_t *p, size_t len) {
  slot_t *s = map_get(&weights, p, len);
  if (s) return (int)(intptr_t)s->val - 1;
  long found = 0;
  size_t entry_len = strlen(spec.entry);
  PB_EACH(p, len) {
    if (f != 2 || w != 2) continue; /* virtual_hosts */
    const uint8_t *vh = d;
    size_t vh_len = n;
    int ours = 0;
    {
      PB_EACH(vh, vh_len) {
        if (f == 1 && w == 2) ours = n == entry_len && memcmp(d, spec.entry, n) == 0;
      }
    }
    if (!ours) continue;
    PB_EACH(vh, vh_len) {
      if (f != 3 || w != 2) continue; /* routes */
      PB_EACH(d, n) {
        if (f != 2 || w != 2) continue; /* Route.route: RouteAction */
        PB_EACH(d, n) {
          if (f != 3 || w != 2) continue; /* weighted_clusters */
          PB_EACH(d, n) {
            if (f != 1 || w != 2) continue; /* clusters: ClusterWeight */
            const uint8_t *name = NULL;
            size_t name_len = 0;
            long weight = 0;
            PB_EACH(d, n) {
              if (f == 1 && w == 2) name = d, name_len = n;
              else if (f == 2 && w == 2) {
                PB_EACH(d, n) {
                  if (f == 1 && w == 0) weight = (long)v;
                }
              }
            }
            if (name && ends_with(name, name_len, spec.lane_part)) found = weight;
          }
        }
      }
      if (found) break;
    }
  }
  map_put(&weights, p, len, (void *)(intptr_t)(found + 1));
  return (int)found;
}

static int type_of(const uint8_t *p, size_t n) {
  for (int t = T_CLUSTER; t <= T_SCOPED; t++)
    if (strlen(TYPE_URLS[t]) == n && memcmp(TYPE_URLS[t], p, n) == 0) return t;
  return T_OTHER;
}

/* ------------------------------------------------------------------ clients, calls, connections */

typedef struct conn conn_t;
typedef struct call call_t;

typedef struct {
  int weight;
  double at;
} seen_t;

typedef struct client {
  int index, delta, configured, connected;
  int nseen, capseen;
  seen_t *seen;
  call_t *call;
  conn_t *conn;
  struct client *next_wake; /* the reconnect queue */
  double wake;
  buf_t node;
  /* SotW stream state: per child (0 EDS, 1 RDS) the latest response and the names subscribed */
  char *latest_version[2], *latest_nonce[2];
  nameset_t *subscribed[2];
  int srds_requested;
  /* delta stream state */
  map_t eds;    /* names subscribed */
  map_t scopes; /* scope name -> interned route config name */
  int eds_started, srds_started;
} client_t;

struct call {
  client_t *client;
  conn_t *conn;
  int32_t stream_id;
  buf_t in;
  buf_t out;
  size_t out_off;
  int deferred, done;
  int code; /* grpc-status, -1 until seen */
  char details[96];
};

struct conn {
  int fd, connecting;
  nghttp2_session *session;
  buf_t pending; /* bytes nghttp2 produced that the socket did not take yet */
  int want_out;  /* EPOLLOUT armed */
  call_t **calls;
  int ncalls;
};

static client_t *clients;
static conn_t **conns;
static int nconns;
static int epfd;
static int stopping;
static long errors_total, reconnects;
static long code_counts[18]; /* by gRPC code; [17]: "ended" (a clean end of the stream) */
static struct {
  char text[160];
  long n;
} details[64];
static int ndetails;
static client_t *wake_head, *wake_tail; /* reconnects, due in order (every delay is the same) */

static void count_detail(const char *text) {
  for (int i = 0; i < ndetails; i++)
    if (strcmp(details[i].text, text) == 0) {
      details[i].n++;
      return;
    }
  if (ndetails < 64) {
    snprintf(details[ndetails].text, sizeof(details[ndetails].text), "%s", text);
    details[ndetails++].n = 1;
  }
}

static void client_saw(client_t *c, int weight) {
  c->configured = 1;
  for (int i = 0; i < c->nseen; i++)
    if (c->seen[i].weight == weight) return;
  if (c->nseen == c->capseen) {
    c->capseen = c->capseen ? c->capseen * 2 : 4;
    c->seen = xrealloc(c->seen, sizeof(seen_t) * c->capseen);
  }
  c->seen[c->nseen].weight = weight;
  c->seen[c->nseen++].at = now_wall();
}

static const seen_t *client_seen(client_t *c, int weight) {
  for (int i = 0; i < c->nseen; i++)
    if (c->seen[i].weight == weight) return &c->seen[i];
  return NULL;
}

static void arm(conn_t *c, int out) {
  if (c->want_out == out) return;
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = out;
}

static void conn_fail(conn_t *c, const char *why);

/* Hands nghttp2's output to the socket; what it does not take waits for EPOLLOUT. */
static void conn_flush(conn_t *c) {
  if (c->session == NULL || c->connecting) return;
  for (;;) {
    if (c->pending.len) {
      ssize_t k = send(c->fd, c->pending.p, c->pending.len, MSG_NOSIGNAL);
      if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          arm(c, 1);
          return;
        }
        conn_fail(c, "connection lost");
        return;
      }
      memmove(c->pending.p, c->pending.p + k, c->pending.len - k);
      c->pending.len -= k;
      if (c->pending.len) {
        arm(c, 1);
        return;
      }
    }
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(c->session, &data);
    if (n < 0) {
      conn_fail(c, "connection lost");
      return;
    }
    if (n == 0) break;
    buf_add(&c->pending, data, n);
  }
  arm(c, 0);
  if (!nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session))
    conn_fail(c, "connection closed");
}

static void schedule_reconnect(client_t *cl) {
  cl->wake = now_mono() + RECONNECT_DELAY;
  cl->next_wake = NULL;
  if (wake_tail) wake_tail->next_wake = cl;
  else wake_head = cl;
  wake_tail = cl;
}

static void client_reset_stream_state(client_t *cl) {
  for (int i = 0; i < 2; i++) {
    free(cl->latest_version[i]);
    free(cl->latest_nonce[i]);
    cl->latest_version[i] = xstrndup("", 0);
    cl->latest_nonce[i] = xstrndup("", 0);
    cl->subscribed[i] = NULL;
  }
  cl->srds_requested = 0;
  map_clear(&cl->eds);
  map_clear(&cl->scopes);
  cl->eds_started = cl->srds_started = 0;
}

/* A call's end: counted as worker.js counts it, the client reconnecting after RECONNECT_DELAY. */
static void call_finish(call_t *call, int code, const char *text) {
  if (call->done) return;
  call->done = 1;
  client_t *cl = call->client;
  conn_t *c = call->conn;
  for (int i = 0; i < c->ncalls; i++)
    if (c->calls[i] == call) {
      c->calls[i] = c->calls[--c->ncalls];
      break;
    }
  cl->call = NULL;
  cl->connected = 0;
  buf_free(&call->in);
  buf_free(&call->out);
  free(call);
  if (stopping) return;
  if (code != 0) {
    char line[160];
    snprintf(line, sizeof(line), "%s: %.80s", code >= 0 && code <= 16 ? CODE_NAMES[code] : "UNKNOWN", text);
    count_detail(line);
  }
  errors_total++;
  code_counts[code == 0 ? 17 : (code >= 0 && code <= 16 ? code : 2)]++;
  reconnects++;
  schedule_reconnect(cl);
}

static void conn_fail(conn_t *c, const char *why) {
  if (c->session == NULL) return;
  nghttp2_session *s = c->session;
  c->session = NULL; /* callbacks from the session's teardown find it gone */
  nghttp2_session_del(s);
  epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
  c->pending.len = 0;
  c->want_out = 0;
  while (c->ncalls) call_finish(c->calls[0], 14, why);
}

/* --- nghttp2 callbacks */

static ssize_t read_out(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length, uint32_t *flags,
                        nghttp2_data_source *src, void *user) {
  (void)s, (void)id, (void)user;
  call_t *call = src->ptr;
  size_t left = call->out.len - call->out_off;
  if (left == 0) {
    call->out.len = call->out_off = 0;
    call->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  size_t k = left < length ? left : length;
  memcpy(buf, call->out.p + call->out_off, k);
  call->out_off += k;
  (void)flags;
  return (ssize_t)k;
}

static void call_write(call_t *call, const buf_t *b) {
  if (call->done || call->conn->session == NULL) return;
  if (call->out_off == call->out.len) call->out.len = call->out_off = 0;
  buf_add(&call->out, b->p, b->len);
  if (call->deferred && call->stream_id > 0) {
    call->deferred = 0;
    nghttp2_session_resume_data(call->conn->session, call->stream_id);
  }
}

static void on_message(call_t *call, const uint8_t *p, size_t len);

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *user) {
  (void)flags, (void)user;
  call_t *call = nghttp2_session_get_stream_user_data(s, id);
  if (call == NULL || call->done || call->code >= 0) return 0;
  buf_t *in = &call->in;
  const uint8_t *p = data;
  size_t n = len;
  if (in->len) {
    buf_add(in, data, len);
    p = in->p;
    n = in->len;
  }
  size_t off = 0;
  while (n - off >= 5) {
    uint32_t mlen;
    memcpy(&mlen, p + off + 1, 4);
    mlen = ntohl(mlen);
    if (p[off] != 0 || mlen > MAX_MESSAGE) {
      call->code = 13;
      snprintf(call->details, sizeof(call->details), "%s", p[off] ? "compressed message" : "message too large");
      nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
      in->len = 0;
      return 0;
    }
    if (n - off - 5 < mlen) break;
    on_message(call, p + off + 5, mlen);
    off += 5 + mlen;
    if (call->code == 13) {
      nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
      in->len = 0;
      return 0;
    }
  }
  if (in->len) {
    memmove(in->p, in->p + off, in->len - off);
    in->len -= off;
  } else if (off < n) {
    buf_add(in, p + off, n - off);
  }
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
  (void)flags, (void)user;
  if (frame->hd.type != NGHTTP2_HEADERS) return 0;
  call_t *call = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  if (call == NULL || call->done) return 0;
  /* grpc-status in trailers, or in the headers of a trailers-only answer */
  if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0 && call->code < 0) {
    int code = 0;
    for (size_t i = 0; i < valuelen && value[i] >= '0' && value[i] <= '9'; i++) code = code * 10 + (value[i] - '0');
    call->code = code;
  } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0 && !call->details[0]) {
    size_t k = valuelen < sizeof(call->details) - 1 ? valuelen : sizeof(call->details) - 1;
    memcpy(call->details, value, k);
    call->details[k] = 0;
  }
  return 0;
}

/* What a stream reset means as a gRPC code (as grpc-js maps it). */
static int reset_code(uint32_t rst) {
  switch (rst) {
    case NGHTTP2_REFUSED_STREAM: return 14;
    case NGHTTP2_CANCEL: return 1;
    case NGHTTP2_ENHANCE_YOUR_CALM: return 8;
    case NGHTTP2_INADEQUATE_SECURITY: return 7;
    default: return 13;
  }
}

static int on_close(nghttp2_session *s, int32_t id, uint32_t error_code, void *user) {
  conn_t *c = user;
  if (c->session == NULL) return 0; /* the connection's teardown: conn_fail ends its calls */
  call_t *call = nghttp2_session_get_stream_user_data(s, id);
  if (call == NULL || call->done) return 0;
  if (call->code >= 0) {
    call_finish(call, call->code, call->details);
  } else if (error_code != NGHTTP2_NO_ERROR) {
    char text[64];
    snprintf(text, sizeof(text), "stream reset (%u)", error_code);
    call_finish(call, reset_code(error_code), text);
  } else {
    call_finish(call, 13, "stream ended without a status");
  }
  return 0;
}

static nghttp2_session_callbacks *callbacks;

static void conn_open(conn_t *c) {
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(spec.port)};
  inet_pton(AF_INET, spec.host, &addr.sin_addr);
  c->connecting = 1;
  if (connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) c->connecting = 0;
  else if (errno != EINPROGRESS) c->connecting = -1; /* failed at once: reported below */
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
  c->want_out = 1;
  nghttp2_session_client_new(&c->session, callbacks, c);
  /* Large windows and frames: fewer WINDOW_UPDATE frames and fewer data callbacks per response. */
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 4 * 1024 * 1024},
      {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, 1024 * 1024},
  };
  nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv, 3);
  nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, 64 * 1024 * 1024);
}

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE}

static void client_start(client_t *cl);

/* One ADS call for `cl` on its connection (opened again if lost). */
static call_t *call_open(client_t *cl, const char *method) {
  conn_t *c = cl->conn;
  if (c->session == NULL) conn_open(c);
  call_t *call = xmalloc(sizeof(*call));
  memset(call, 0, sizeof(*call));
  call->client = cl;
  call->conn = c;
  call->code = -1;
  c->calls[c->ncalls++] = call;
  cl->call = call;
  nghttp2_nv nva[] = {
      NV(":method", "POST"), NV(":scheme", "http"), NV(":path", method), NV(":authority", spec.authority),
      NV("content-type", "application/grpc"), NV("te", "trailers"), NV("grpc-accept-encoding", "identity"),
      NV("user-agent", "graylane-fleet-c"),
  };
  nghttp2_data_provider prd = {.source.ptr = call, .read_callback = read_out};
  call->stream_id = nghttp2_submit_request(c->session, NULL, nva, sizeof(nva) / sizeof(nva[0]), &prd, call);
  if (call->stream_id < 0) {
    call_finish(call, 14, nghttp2_strerror(call->stream_id));
    return NULL;
  }
  return call;
}

/* --- requests */

static buf_t scratch;

static void sotw_request(buf_t *b, int type, const char *version, const char *nonce, const nameset_t *names,
                         const buf_t *node) {
  size_t at = frame_begin(b);
  if (node) pb_bytes(b, 2, node->p, node->len);
  pb_str(b, 4, TYPE_URLS[type]);
  pb_str(b, 1, version);
  pb_str(b, 5, nonce);
  if (names) buf_add(b, names->encoded.p, names->encoded.len);
  frame_end(b, at);
}

static void delta_request(buf_t *b, int type, const char *nonce, const char **sub, int nsub, const char **unsub,
                          int nunsub, const buf_t *node) {
  size_t at = frame_begin(b);
  if (node) pb_bytes(b, 1, node->p, node->len);
  pb_str(b, 2, TYPE_URLS[type]);
  pb_str(b, 6, nonce);
  for (int i = 0; i < nsub; i++) pb_str(b, 3, sub[i]);
  for (int i = 0; i < nunsub; i++) pb_str(b, 4, unsub[i]);
  frame_end(b, at);
}

/* --- responses */

#define MAX_RES_INIT 256
static span_t *res_spans;
static int res_cap;
static const char **res_names; /* delta: each resource's name (interned) */

static void res_push(int *nres, const uint8_t *p, size_t len, const char *name) {
  if (*nres == res_cap) {
    res_cap = res_cap ? res_cap * 2 : MAX_RES_INIT;
    res_spans = xrealloc(res_spans, sizeof(span_t) * res_cap);
    res_names = xrealloc(res_names, sizeof(char *) * res_cap);
  }
  res_spans[*nres].p = p;
  res_spans[*nres].len = len;
  res_names[*nres] = name;
  (*nres)++;
}

/* An Any's value (field 2). */
static span_t any_value(const uint8_t *p, size_t len) {
  span_t out = {(const uint8_t *)"", 0};
  PB_EACH(p, len) {
    if (f == 2 && w == 2) out.p = d, out.len = n;
  }
  return out;
}

static void on_sotw(call_t *call, const uint8_t *p, size_t len) {
  client_t *cl = call->client;
  int type = T_OTHER, nres = 0;
  char *version = NULL, *nonce = NULL;
  {
    PB_EACH(p, len) {
      if (w != 2) continue;
      if (f == 4) type = type_of(d, n);
      else if (f == 1) free(version), version = xstrndup(d, n);
      else if (f == 5) free(nonce), nonce = xstrndup(d, n);
      else if (f == 2) {
        span_t s = any_value(d, n);
        res_push(&nres, s.p, s.len, NULL);
      }
    }
    if (rc_ < 0) {
      call->code = 13;
      snprintf(call->details, sizeof(call->details), "bad response");
      goto out;
    }
  }
  if (!version) version = xstrndup("", 0);
  if (!nonce) nonce = xstrndup("", 0);
  scratch.len = 0;
  if (type == T_CLUSTER || type == T_SCOPED) {
    int child = type == T_CLUSTER ? 0 : 1;
    nameset_t *set = type == T_CLUSTER ? eds_names(version, res_spans, nres) : route_configs(version, res_spans, nres);
    sotw_request(&scratch, type, version, nonce, NULL, NULL);
    if (cl->subscribed[child] != set) {
      cl->subscribed[child] = set;
      sotw_request(&scratch, child ? T_ROUTE : T_ENDPOINT, cl->latest_version[child], cl->latest_nonce[child], set,
                   NULL);
    }
  } else if (type == T_ENDPOINT || type == T_ROUTE) {
    int child = type == T_ENDPOINT ? 0 : 1;
    free(cl->latest_version[child]);
    free(cl->latest_nonce[child]);
    cl->latest_version[child] = xstrndup(version, strlen(version));
    cl->latest_nonce[child] = xstrndup(nonce, strlen(nonce));
    sotw_request(&scratch, type, version, nonce, cl->subscribed[child] ? cl->subscribed[child] : NO_NAMES, NULL);
    if (type == T_ROUTE)
      for (int i = 0; i < nres; i++)
        if (is_entry(res_spans[i].p, res_spans[i].len)) client_saw(cl, route_weight(res_spans[i].p, res_spans[i].len));
  } else if (type == T_LISTENER) {
    sotw_request(&scratch, type, version, nonce, NULL, NULL);
    if (!cl->srds_requested) { /* the listener's scoped routes subscribe to SRDS */
      cl->srds_requested = 1;
      sotw_request(&scratch, T_SCOPED, "", "", NULL, NULL);
    }
  }
  if (scratch.len) call_write(call, &scratch);
out:
  free(version);
  free(nonce);
}

static int cmp_ptr_str(const void *a, const void *b) { return cmp_str(a, b); }

/* The distinct route config names a client's scopes name (interned pointers), sorted. */
static int scope_values(map_t *scopes, const char ***out) {
  const char **vals = xmalloc(sizeof(char *) * (scopes->live + 1));
  int k = 0;
  for (size_t i = 0; i < scopes->cap; i++) {
    slot_t *s = &scopes->slots[i];
    if (s->key == NULL || s->key == TOMB) continue;
    int dup = 0;
    for (int j = 0; j < k && !dup; j++) dup = vals[j] == s->val;
    if (!dup) vals[k++] = s->val;
  }
  qsort(vals, k, sizeof(char *), cmp_ptr_str);
  *out = vals;
  return k;
}

/* Names in a (sorted, distinct) but not in b. */
static int minus(const char **a, int na, const char **b, int nb, const char **out) {
  int k = 0;
  for (int i = 0; i < na; i++) {
    int found = 0;
    for (int j = 0; j < nb && !found; j++) found = a[i] == b[j];
    if (!found) out[k++] = a[i];
  }
  return k;
}

static void on_delta(call_t *call, const uint8_t *p, size_t len) {
  client_t *cl = call->client;
  int type = T_OTHER, nres = 0, nremoved = 0, capremoved = 0;
  char *nonce = NULL;
  const char **removed = NULL;
  {
    PB_EACH(p, len) {
      if (w != 2) continue;
      if (f == 4) type = type_of(d, n);
      else if (f == 5) free(nonce), nonce = xstrndup(d, n);
      else if (f == 6) {
        if (nremoved == capremoved) {
          capremoved = capremoved ? capremoved * 2 : 16;
          removed = xrealloc(removed, sizeof(char *) * capremoved);
        }
        removed[nremoved++] = intern(d, n);
      } else if (f == 2) {
        const char *name = intern("", 0);
        span_t value = {NULL, 0};
        PB_EACH(d, n) {
          if (f == 3 && w == 2) name = intern(d, n);
          else if (f == 2 && w == 2) value = any_value(d, n);
        }
        res_push(&nres, value.p, value.len, name);
      }
    }
    if (rc_ < 0) {
      call->code = 13;
      snprintf(call->details, sizeof(call->details), "bad response");
      goto out;
    }
  }
  if (!nonce) nonce = xstrndup("", 0);
  scratch.len = 0;
  delta_request(&scratch, type, nonce, NULL, 0, NULL, 0, NULL);
  if (type == T_CLUSTER) {
    const char **added = xmalloc(sizeof(char *) * (nres + 1));
    const char **gone = xmalloc(sizeof(char *) * (nremoved + 1));
    int nadded = 0, ngone = 0;
    for (int i = 0; i < nres; i++) {
      const char *name = res_names[i];
      if (map_get(&cl->eds, name, strlen(name))) continue;
      int dup = 0;
      for (int j = 0; j < nadded && !dup; j++) dup = added[j] == name;
      if (!dup) added[nadded++] = name;
    }
    for (int i = 0; i < nremoved; i++)
      if (map_get(&cl->eds, removed[i], strlen(removed[i]))) gone[ngone++] = removed[i];
    for (int i = 0; i < nadded; i++) map_put(&cl->eds, added[i], strlen(added[i]), NULL);
    for (int i = 0; i < ngone; i++) map_del(&cl->eds, gone[i], strlen(gone[i]));
    if (nadded || ngone || !cl->eds_started) {
      cl->eds_started = 1;
      delta_request(&scratch, T_ENDPOINT, "", added, nadded, gone, ngone, NULL);
    }
    free(added);
    free(gone);
  } else if (type == T_LISTENER && !cl->srds_started) {
    cl->srds_started = 1;
    delta_request(&scratch, T_SCOPED, "", NULL, 0, NULL, 0, NULL); /* wildcard */
  } else if (type == T_SCOPED) {
    const char **before, **after;
    int nbefore = scope_values(&cl->scopes, &before);
    for (int i = 0; i < nres; i++) {
      const char *target = scope_target(res_spans[i].p, res_spans[i].len);
      map_put(&cl->scopes, res_names[i], strlen(res_names[i]), (void *)target);
    }
    for (int i = 0; i < nremoved; i++) map_del(&cl->scopes, removed[i], strlen(removed[i]));
    int nafter = scope_values(&cl->scopes, &after);
    const char **sub = xmalloc(sizeof(char *) * (nafter + 1));
    const char **unsub = xmalloc(sizeof(char *) * (nbefore + 1));
    int nsub = minus(after, nafter, before, nbefore, sub);
    int nunsub = minus(before, nbefore, after, nafter, unsub);
    if (nsub || nunsub) delta_request(&scratch, T_ROUTE, "", sub, nsub, unsub, nunsub, NULL);
    free(before);
    free(after);
    free(sub);
    free(unsub);
  } else if (type == T_ROUTE) {
    for (int i = 0; i < nres; i++)
      if (res_names[i] == entry_route && res_spans[i].p != NULL)
        client_saw(cl, route_weight(res_spans[i].p, res_spans[i].len));
  }
  call_write(call, &scratch);
out:
  free(nonce);
  free(removed);
}

static void on_message(call_t *call, const uint8_t *p, size_t len) {
  if (call->client->delta) on_delta(call, p, len);
  else on_sotw(call, p, len);
}

/* As Envoy opens a stream: CDS and LDS wildcard, the node on the first request. */
static void client_start(client_t *cl) {
  if (stopping) return;
  client_reset_stream_state(cl);
  call_t *call = call_open(cl, cl->delta ? DELTA_METHOD : SOTW_METHOD);
  if (call == NULL) return;
  scratch.len = 0;
  if (cl->delta) {
    delta_request(&scratch, T_CLUSTER, "", NULL, 0, NULL, 0, &cl->node);
    delta_request(&scratch, T_LISTENER, "", NULL, 0, NULL, 0, NULL);
  } else {
    sotw_request(&scratch, T_CLUSTER, "", "", NULL, &cl->node);
    sotw_request(&scratch, T_LISTENER, "", "", NULL, NULL);
  }
  call_write(call, &scratch);
  cl->connected = 1;
  conn_flush(cl->conn);
}

/* envoy.config.core.v3.Node {id 1, cluster 2, metadata 3: Struct {fields 1: map<string, Value
 * {string_value 3}>}}, as worker.js sends it. */
static void encode_node(client_t *cl) {
  char id[32], port[16];
  snprintf(id, sizeof(id), "fleet-%d", cl->index);
  snprintf(port, sizeof(port), "%d", spec.listen_port);
  buf_t value = {0}, entry = {0}, meta = {0};
  pb_str(&value, 3, port);
  pb_str(&entry, 1, "listen_port");
  pb_bytes(&entry, 2, value.p, value.len);
  pb_bytes(&meta, 1, entry.p, entry.len);
  pb_str(&cl->node, 1, id);
  pb_str(&cl->node, 2, "graylane");
  pb_bytes(&cl->node, 3, meta.p, meta.len);
  buf_free(&value);
  buf_free(&entry);
  buf_free(&meta);
}

/* ------------------------------------------------------------------ commands on stdin */

static buf_t out_line;

static void out_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out_printf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  buf_reserve(&out_line, n + 1);
  va_start(ap, fmt);
  vsnprintf((char *)out_line.p + out_line.len, n + 1, fmt, ap);
  va_end(ap);
  out_line.len += n;
}

static void json_str(const char *s) {
  out_printf("\"");
  for (; *s; s++) {
    unsigned char ch = *s;
    if (ch == '"' || ch == '\\') out_printf("\\%c", ch);
    else if (ch < 0x20) out_printf("\\u%04x", ch);
    else out_printf("%c", ch);
  }
  out_printf("\"");
}

static void status_json(void) {
  int connected = 0, configured = 0;
  for (int i = 0; i < spec.count; i++) {
    connected += clients[i].connected;
    configured += clients[i].configured;
  }
  out_printf("{\"connected\": %d, \"configured\": %d, \"errors\": %ld, \"reconnects\": %ld, \"error_codes\": {",
             connected, configured, errors_total, reconnects);
  int first = 1;
  for (int i = 1; i < 18; i++) {
    if (!code_counts[i]) continue;
    out_printf("%s\"%s\": %ld", first ? "" : ", ", i == 17 ? "ended" : CODE_NAMES[i], code_counts[i]);
    first = 0;
  }
  out_printf("}, \"error_details\": {");
  /* the five most frequent */
  int used[64] = {0};
  for (int k = 0; k < 5 && k < ndetails; k++) {
    int best = -1;
    for (int i = 0; i < ndetails; i++)
      if (!used[i] && (best < 0 || details[i].n > details[best].n)) best = i;
    used[best] = 1;
    out_printf("%s", k ? ", " : "");
    json_str(details[best].text);
    out_printf(": %ld", details[best].n);
  }
  out_printf("}}");
}

static void write_out(void) {
  size_t off = 0;
  while (off < out_line.len) {
    ssize_t k = write(1, out_line.p + off, out_line.len - off);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        continue;
      }
      exit(0); /* the parent went away */
    }
    off += k;
  }
  out_line.len = 0;
}

static void stop_all(void) {
  stopping = 1;
  for (int i = 0; i < nconns; i++) {
    conn_t *c = conns[i];
    if (c->session == NULL) continue;
    for (int j = 0; j < c->ncalls; j++)
      if (c->calls[j]->stream_id > 0) nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, c->calls[j]->stream_id, NGHTTP2_CANCEL);
    nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0);
    const uint8_t *data;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(c->session, &data)) > 0) buf_add(&c->pending, data, n);
    if (c->pending.len && !c->connecting) {
      int flags = fcntl(c->fd, F_GETFL);
      fcntl(c->fd, F_SETFL, flags & ~O_NONBLOCK);
      (void)!send(c->fd, c->pending.p, c->pending.len, MSG_NOSIGNAL);
    }
    close(c->fd);
  }
}

/* One command line: [id, "name", arg?]. Returns 0 to go on, 1 to stop. */
static int command(char *line) {
  char *p = strchr(line, '[');
  if (!p) return 0;
  long id = strtol(p + 1, &p, 10);
  char *q1 = strchr(p, '"');
  if (!q1) return 0;
  char *q2 = strchr(q1 + 1, '"');
  if (!q2) return 0;
  *q2 = 0;
  const char *name = q1 + 1;
  char *rest = q2 + 1;
  while (*rest == ',' || *rest == ' ') rest++;
  int weight = (int)strtol(rest, NULL, 10);
  out_printf("{\"id\": %ld, \"result\": ", id);
  if (strcmp(name, "status") == 0) {
    status_json();
  } else if (strcmp(name, "seen") == 0) {
    out_printf("[");
    for (int i = 0; i < spec.count; i++) {
      const seen_t *s = client_seen(&clients[i], weight);
      if (s) out_printf("%s%.6f", i ? ", " : "", s->at);
      else out_printf("%snull", i ? ", " : "");
    }
    out_printf("]");
  } else if (strcmp(name, "missing") == 0) {
    int missing = 0;
    for (int i = 0; i < spec.count; i++) missing += client_seen(&clients[i], weight) == NULL;
    out_printf("%d", missing);
  } else if (strcmp(name, "stop") == 0) {
    status_json(); /* the status before the clients are cancelled */
    out_printf("}\n");
    stop_all();
    write_out();
    return 1;
  } else {
    out_printf("{\"error\": ");
    char text[80];
    snprintf(text, sizeof(text), "unknown command %s", name);
    json_str(text);
    out_printf("}");
  }
  out_printf("}\n");
  write_out();
  return 0;
}

/* ------------------------------------------------------------------ main loop */

int main(int argc, char **argv) {
  if (argc != 11) {
    fprintf(stderr,
            "usage: %s HOST PORT FIRST COUNT DELTA_EVERY ENTRY LANE_CLUSTER_PART CONNECT_RATE LISTEN_PORT "
            "STREAMS_PER_CHANNEL\n",
            argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  snprintf(spec.host, sizeof(spec.host), "%s", strcmp(argv[1], "localhost") == 0 ? "127.0.0.1" : argv[1]);
  spec.port = atoi(argv[2]);
  spec.first = atoi(argv[3]);
  spec.count = atoi(argv[4]);
  spec.delta_every = atoi(argv[5]);
  spec.entry = argv[6];
  spec.lane_part = argv[7];
  spec.rate = atof(argv[8]);
  spec.listen_port = atoi(argv[9]);
  spec.per_channel = atoi(argv[10]) > 0 ? atoi(argv[10]) : 10;
  snprintf(spec.authority, sizeof(spec.authority), "%s:%d", argv[1], spec.port);

  char route_name[512];
  snprintf(route_name, sizeof(route_name), "graylane/%s", spec.entry); /* route_config_name(service) */
  entry_route = intern(route_name, strlen(route_name));
  /* A serialized RouteConfiguration starts with its name (field 1). */
  pb_str(&entry_prefix, 1, route_name);
  NO_NAMES = nameset_of(NULL, 0);

  nghttp2_session_callbacks_new(&callbacks);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data);
  nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_close);

  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) die("epoll_create1");
  clients = calloc(spec.count, sizeof(client_t));
  nconns = (spec.count + spec.per_channel - 1) / spec.per_channel;
  conns = calloc(nconns ? nconns : 1, sizeof(conn_t *));
  for (int i = 0; i < nconns; i++) {
    conns[i] = calloc(1, sizeof(conn_t));
    conns[i]->fd = -1;
    conns[i]->calls = calloc(spec.per_channel, sizeof(call_t *));
  }
  for (int i = 0; i < spec.count; i++) {
    client_t *cl = &clients[i];
    cl->index = spec.first + i;
    cl->delta = spec.delta_every && cl->index % spec.delta_every == 0;
    cl->conn = conns[i / spec.per_channel];
    encode_node(cl);
  }
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
  static int stdin_tag;
  struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
  epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);

  buf_t input = {0};
  double t0 = now_mono();
  int started = 0;
  /* GRAYLANE_FLEET_C_BATCH_MS (default 2; 0: off): after a batch of socket events, the next
   * epoll_wait waits until this long after the batch began. Responses to a connection's streams
   * then arrive together, so one recv takes them and one send carries their ACKs: on loopback
   * every segment costs kernel time on both ends (two thirds of this worker's CPU per change
   * was system time), and the control plane's writes to the same connection coalesce too. */
  const char *batch_env = getenv("GRAYLANE_FLEET_C_BATCH_MS");
  double batch = (batch_env ? atof(batch_env) : 2.0) / 1000.0;
  double batch_began = 0;
  struct epoll_event events[1024];
  for (;;) {
    if (batch > 0 && batch_began > 0) {
      double wait = batch_began + batch - now_mono();
      if (wait > 0) {
        struct timespec ts = {0, (long)(wait * 1e9)};
        nanosleep(&ts, NULL);
      }
      batch_began = 0;
    }
    /* Clients start at `rate` per second, in ticks of 5 ms. */
    double now = now_mono();
    if (started < spec.count) {
      long due = spec.rate > 0 ? (long)((now - t0) * spec.rate) + 1 : spec.count;
      if (due > spec.count) due = spec.count;
      while (started < due) client_start(&clients[started++]);
    }
    while (wake_head && wake_head->wake <= now) {
      client_t *cl = wake_head;
      wake_head = cl->next_wake;
      if (!wake_head) wake_tail = NULL;
      client_start(cl);
    }
    int timeout = -1;
    if (started < spec.count) timeout = 5;
    if (wake_head) {
      int ms = (int)((wake_head->wake - now) * 1000) + 1;
      if (timeout < 0 || ms < timeout) timeout = ms < 0 ? 0 : ms;
    }
    int n = epoll_wait(epfd, events, 1024, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    if (n > 0) batch_began = now_mono();
    for (int i = 0; i < n; i++) {
      if (events[i].data.ptr == &stdin_tag) {
        char tmp[4096];
        for (;;) {
          ssize_t k = read(0, tmp, sizeof(tmp));
          if (k == 0) { /* the parent went away (or closed our stdin): stop rather than linger */
            stop_all();
            return 0;
          }
          if (k < 0) break;
          buf_add(&input, tmp, k);
        }
        char *start = (char *)input.p;
        char *nl;
        while ((nl = memchr(start, '\n', input.len - (start - (char *)input.p))) != NULL) {
          *nl = 0;
          if (command(start)) return 0;
          start = nl + 1;
        }
        size_t left = input.len - (start - (char *)input.p);
        memmove(input.p, start, left);
        input.len = left;
        continue;
      }
      conn_t *c = events[i].data.ptr;
      if (c->session == NULL) continue;
      if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (c->connecting < 0 || getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
          conn_fail(c, "failed to connect");
          continue;
        }
        if (!(events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) continue;
        c->connecting = 0;
      }
      if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        uint8_t tmp[65536];
        for (;;) {
          ssize_t k = recv(c->fd, tmp, sizeof(tmp), 0);
          if (k == 0) {
            conn_fail(c, "connection lost");
            break;
          }
          if (k < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) conn_fail(c, "connection lost");
            break;
          }
          ssize_t used = nghttp2_session_mem_recv(c->session, tmp, k);
          if (c->session == NULL) break;
          if (used < 0) {
            conn_fail(c, "protocol error");
            break;
          }
          if ((size_t)k < sizeof(tmp)) break;
        }
      }
      if (c->session) conn_flush(c);
    }
  }
}

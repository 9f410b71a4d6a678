package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	errNoKey           = errors.New("missing API key: send X-C3-API-KEY or Authorization: Bearer")
	errBadKey          = errors.New("malformed API key")
	errNoRoute         = errors.New("unknown route: use /tags/{tag}/..., /tags/all/..., /{n}/..., /workloads or /healthz")
	errNotFound        = errors.New("no routable workload")
	errNodeUnreachable = errors.New("node failed")
	errMethod          = errors.New("method not allowed")
)

// statusClientClosed is logged (never sent) when the client went away
// before an answer was ready, as nginx does.
const statusClientClosed = 499

// statusOf maps an error to the status that the client gets.
func statusOf(err error) int {
	switch {
	case errors.Is(err, errNoKey), errors.Is(err, errBadKey), errors.Is(err, errKeyRejected):
		return http.StatusUnauthorized
	case errors.Is(err, errTooManyKeys):
		return http.StatusServiceUnavailable
	case errors.Is(err, errNoRoute), errors.Is(err, errNotFound):
		return http.StatusNotFound
	case errors.Is(err, errMethod):
		return http.StatusMethodNotAllowed
	case errors.Is(err, errNodeUnreachable), errors.Is(err, errAPIUnavailable):
		return http.StatusBadGateway
	case errors.Is(err, context.Canceled):
		return statusClientClosed
	}
	return http.StatusInternalServerError
}

// writeJSON sends v as a JSON body with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client is gone; nothing to do
}

// writeError sends err as {"error": "..."}. A 500 carries no detail: that goes to the log.
func writeError(w http.ResponseWriter, status int, err error) {
	msg := err.Error()
	if status == http.StatusInternalServerError {
		msg = "internal proxy error"
	}
	writeJSON(w, status, map[string]string{"error": msg})
}

// apiKey returns the client's Comput3 key: X-C3-API-KEY, else an
// Authorization Bearer token, else "".
func apiKey(h http.Header) string {
	if k := strings.TrimSpace(h.Get("X-C3-API-KEY")); k != "" {
		return k
	}
	const bearer = "bearer "
	if a := h.Get("Authorization"); len(a) > len(bearer) && strings.EqualFold(a[:len(bearer)], bearer) {
		return strings.TrimSpace(a[len(bearer):])
	}
	return ""
}

// maxKeyLen bounds the keys worth asking the Comput3 API about.
const maxKeyLen = 512

// plausibleKey rejects keys that no API call could validate: too long, or
// holding spaces or control characters.
func plausibleKey(key string) bool {
	if len(key) > maxKeyLen {
		return false
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

type routeKind uint8

const (
	routeTag routeKind = iota + 1
	routeIndex
	routeWorkloads
)

func (k routeKind) String() string {
	switch k {
	case routeTag:
		return "tags"
	case routeIndex:
		return "index"
	case routeWorkloads:
		return "workloads"
	}
	return "other"
}

// route is a parsed request path.
type route struct {
	kind  routeKind
	tag   string // routeTag: the unescaped tag
	index int    // routeIndex
	rest  string // the escaped path to forward, starting with "/"
}

// parseRoute parses an escaped request path. Splitting happens before
// unescaping, so "%2F" inside a tag or the rest never counts as a separator.
func parseRoute(path string) (route, error) {
	if !strings.HasPrefix(path, "/") {
		return route{}, errNoRoute
	}
	first, rest := cut(path[1:])
	switch {
	case first == "workloads" && rest == "":
		return route{kind: routeWorkloads}, nil
	case first == "tags":
		tagSeg, rest := cut(strings.TrimPrefix(rest, "/"))
		tag, err := url.PathUnescape(tagSeg)
		if tagSeg == "" || err != nil {
			return route{}, errNoRoute
		}
		return route{kind: routeTag, tag: tag, rest: restPath(rest)}, nil
	case first != "" && strings.Trim(first, "0123456789") == "":
		n, err := strconv.Atoi(first)
		if err != nil {
			n = int(^uint(0) >> 1) // too large for an int: out of range of any list
		}
		return route{kind: routeIndex, index: n, rest: restPath(rest)}, nil
	}
	return route{}, errNoRoute
}

// cut splits "a/b/c" into "a" and "/b/c".
func cut(s string) (first, rest string) {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return s[:i], s[i:]
	}
	return s, ""
}

func restPath(rest string) string {
	if rest == "" {
		return "/"
	}
	return rest
}

// forward carries one proxied request's choice from ServeHTTP to the
// ReverseProxy hooks and the failover transport, through the request
// context. Only the handler's goroutine touches it.
type forward struct {
	rest   string
	set    *nodeSet    // the tag route's candidates; nil for an index route (no failover)
	base   *url.URL    // the node now chosen
	host   string      // its host
	load   *nodeLoad   // its load, acquired; released when the request ends
	tried  []*nodeLoad // nodes that failed this request
	status int         // set by ModifyResponse or ErrorHandler
}

// target points u at the chosen node: its scheme and host, and the rest of
// the path below its base path, with the client's encoding kept.
func (fw *forward) target(u *url.URL) {
	u.Scheme, u.Host = fw.base.Scheme, fw.base.Host
	u.RawPath = strings.TrimSuffix(fw.base.EscapedPath(), "/") + fw.rest
	u.Path, _ = url.PathUnescape(u.RawPath) // valid: built from escaped parts
}

type forwardKey struct{}

// proxy is the HTTP handler of c3-node-proxy.
type proxy struct {
	cache   *cache
	bal     *balancer
	nodes   http.RoundTripper // reaches the nodes
	retries int               // extra nodes a failed tag request may try
	log     *slog.Logger
	rp      *httputil.ReverseProxy
}

func newProxy(c *cache, b *balancer, nodes http.RoundTripper, retries int, log *slog.Logger) *proxy {
	p := &proxy{cache: c, bal: b, nodes: nodes, retries: retries, log: log}
	p.rp = &httputil.ReverseProxy{
		Rewrite:   rewrite,
		Transport: roundTripFunc(p.roundTrip),
		// Streams go out chunk by chunk anyway: ReverseProxy flushes after
		// every read for text/event-stream and for any body without a length
		// (chunked NDJSON). A positive or negative interval would also arm a
		// timer per response, and -1 sends the headers of every response in
		// a write of their own: a third of the CPU on small requests.
		FlushInterval:  0,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ModifyResponse: recordStatus,
		ErrorHandler:   p.nodeFailed,
		BufferPool:     &copyBuffers{},
	}
	return p
}

// copyBufferSize is the size of the buffers that carry response bodies.
const copyBufferSize = 32 << 10

// copyBuffers recycles the response copy buffers: without it ReverseProxy
// allocates 32 KiB per request. Buffers are kept as array pointers, so that
// Put allocates nothing.
type copyBuffers struct{ pool sync.Pool }

func (b *copyBuffers) Get() []byte {
	if buf, ok := b.pool.Get().(*[copyBufferSize]byte); ok {
		return buf[:]
	}
	return make([]byte, copyBufferSize)
}

func (b *copyBuffers) Put(buf []byte) {
	if len(buf) == copyBufferSize {
		b.pool.Put((*[copyBufferSize]byte)(buf))
	}
}

// rewrite points the outbound request at the chosen node. Method, headers
// (the key included: nodes need it), body and query pass unchanged.
func rewrite(pr *httputil.ProxyRequest) {
	pr.In.Context().Value(forwardKey{}).(*forward).target(pr.Out.URL)
	// ReverseProxy re-encodes queries it finds unusual; we do not read the
	// query, so the node gets exactly what the client sent.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	pr.Out.Host = ""
	if prior := pr.In.Header["X-Forwarded-For"]; len(prior) > 0 {
		pr.Out.Header["X-Forwarded-For"] = prior // SetXForwarded appends the client
	}
	pr.SetXForwarded()
}

func recordStatus(res *http.Response) error {
	if fw, ok := res.Request.Context().Value(forwardKey{}).(*forward); ok {
		fw.status = res.StatusCode
	}
	return nil
}

// nodeFailed answers 502 when the node could not be reached or failed
// before its response started.
func (p *proxy) nodeFailed(w http.ResponseWriter, r *http.Request, err error) {
	fw := r.Context().Value(forwardKey{}).(*forward)
	err = fmt.Errorf("%w: node %s: %w", errNodeUnreachable, fw.host, err)
	if r.Context().Err() != nil {
		err = fmt.Errorf("%w: %w", context.Canceled, err)
	}
	fw.status = statusOf(err)
	p.fail(w, r, err)
}

// fail logs err at the level its status deserves and answers it.
func (p *proxy) fail(w http.ResponseWriter, r *http.Request, err error) {
	status := statusOf(err)
	switch {
	case status == statusClientClosed:
		p.log.Debug("client went away", "path", r.URL.Path, "err", err)
		return
	case status == http.StatusInternalServerError:
		p.log.Error("internal error", "method", r.Method, "err", err)
	case status == http.StatusBadGateway:
		p.log.Warn("bad gateway", "method", r.Method, "err", err)
	}
	if status == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", "GET, HEAD")
	}
	writeError(w, status, err)
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.EscapedPath()
	if path == "/" || path == "/healthz" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			p.fail(w, r, errMethod)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
		return
	}
	key := apiKey(r.Header)
	if key == "" {
		p.fail(w, r, errNoKey)
		return
	}
	if !plausibleKey(key) {
		p.fail(w, r, errBadKey)
		return
	}
	rt, err := parseRoute(path)
	if err != nil {
		p.fail(w, r, err)
		return
	}
	if rt.kind == routeWorkloads && r.Method != http.MethodGet && r.Method != http.MethodHead {
		p.fail(w, r, errMethod)
		return
	}
	start := time.Now()
	e, snap, err := p.cache.get(r.Context(), key, start)
	if err != nil {
		p.fail(w, r, err)
		return
	}
	defer e.done()
	if rt.kind == routeWorkloads {
		writeJSON(w, http.StatusOK, snap.workloads)
		return
	}
	p.forward(w, r, e, snap, rt, start)
}

// forward chooses the node for rt, re-fetching the key's list once when
// the route finds nothing in a list that may be stale, and proxies r to it.
func (p *proxy) forward(w http.ResponseWriter, r *http.Request, e *entry, snap *snapshot, rt route, start time.Time) {
	fw := &forward{rest: rt.rest}
	err := p.choose(snap, rt, fw, start)
	if errors.Is(err, errNotFound) {
		if snap, err = p.cache.refetch(r.Context(), e, snap, start); err == nil {
			err = p.choose(snap, rt, fw, start)
		}
	}
	if err != nil {
		p.fail(w, r, err)
		return
	}
	defer p.finish(fw)
	defer func() {
		// ReverseProxy panics with ErrAbortHandler to abort a broken stream;
		// the server handles that. Anything else is our bug: answer 500
		// while the response has not started, abort the stream otherwise.
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler || fw.status != 0 {
				panic(v)
			}
			fw.status = http.StatusInternalServerError
			p.fail(w, r, fmt.Errorf("panic while proxying to %s: %v", fw.host, v))
		}
	}()

	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), forwardKey{}, fw)))

	if p.log.Enabled(r.Context(), slog.LevelDebug) {
		p.log.Debug("proxied", "route", rt.kind, "tag", rt.tag, "index", rt.index,
			"node", fw.host, "in_flight", fw.load.inFlight.Load(), "status", fw.status,
			"tried", len(fw.tried)+1, "duration", time.Since(start), "key", e.fp)
	}
}

// finish releases the node a request ended on.
func (p *proxy) finish(fw *forward) { p.bal.release(fw.load) }

// choose picks the node for rt in snap and records it, acquired, in fw.
func (p *proxy) choose(snap *snapshot, rt route, fw *forward, now time.Time) error {
	if rt.kind == routeIndex {
		if rt.index >= len(snap.indexed.hosts) {
			return fmt.Errorf("%w at index %d (%d routable)", errNotFound, rt.index, len(snap.indexed.hosts))
		}
		fw.base, fw.host = snap.indexed.bases[rt.index], snap.indexed.hosts[rt.index]
		fw.load = p.bal.acquire(fw.host)
		return nil
	}
	fw.set = snap.withTag(rt.tag)
	if fw.set == nil {
		return fmt.Errorf("%w with tag %q", errNotFound, rt.tag)
	}
	i, load := p.bal.pickLeastBusy(fw.set.hosts, now, nil)
	fw.base, fw.host, fw.load = fw.set.bases[i], fw.set.hosts[i], load
	return nil
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// roundTrip is the ReverseProxy's transport. It sends req to the chosen
// node and keeps the node's passive health. When the node fails before
// answering, a tag route tries another node of its tag, up to p.retries
// more, never the same one twice, and only while no byte of the body has
// been consumed.
func (p *proxy) roundTrip(req *http.Request) (*http.Response, error) {
	fw := req.Context().Value(forwardKey{}).(*forward)
	var body *attemptBody
	if req.Body != nil && fw.set != nil && p.retries > 0 {
		body = &attemptBody{mu: new(sync.Mutex), src: req.Body}
		req.Body = body
	}
	for attempt := 0; ; attempt++ {
		res, err := p.nodes.RoundTrip(req)
		if err == nil {
			if p.bal.succeeded(fw.load) {
				p.log.Info("node back up", "node", fw.host)
			}
			return res, nil
		}
		if req.Context().Err() != nil {
			return nil, err // the client left: not the node's fault
		}
		now := time.Now()
		if cooldown, wentDown := p.bal.failed(fw.load, now); wentDown {
			p.log.Info("node marked down", "node", fw.host, "cooldown", cooldown, "err", err)
		}
		if fw.set == nil || attempt >= p.retries || !body.abandon() {
			return nil, err
		}
		fw.tried = append(fw.tried, fw.load)
		i, next := p.bal.pickLeastBusy(fw.set.hosts, now, fw.tried)
		if next == nil {
			return nil, err
		}
		p.log.Warn("node failed before answering; trying another", "node", fw.host, "next", fw.set.hosts[i], "err", err)
		p.bal.release(fw.load)
		fw.base, fw.host, fw.load = fw.set.bases[i], fw.set.hosts[i], next
		req = req.Clone(req.Context())
		fw.target(req.URL)
		if body != nil {
			body = body.next()
			req.Body = body
		}
	}
}

// errAttemptOver is what a transport still reading the body of an attempt
// that was given up gets instead of bytes.
var errAttemptOver = errors.New("request body: attempt abandoned for another node")

// attemptBody is the request body as one attempt sees it. The transport may
// go on reading a body after RoundTrip returned (golang/go#40747), so every
// attempt gets its own view: the one given up is cut off, and reads of the
// shared source are serialised, so no byte can go to an abandoned attempt
// after the next one started. Wrappers are never reused.
type attemptBody struct {
	mu   *sync.Mutex // shared by every attempt of one request; guards src and read
	src  io.Reader
	read int64 // bytes this attempt consumed
	dead bool  // abandoned: reads fail
}

func (b *attemptBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead {
		return 0, errAttemptOver
	}
	n, err := b.src.Read(p)
	b.read += int64(n)
	return n, err
}

// Close does nothing: the inbound body belongs to the server, and
// ReverseProxy closes its own wrapper of it.
func (b *attemptBody) Close() error { return nil }

// abandon cuts this attempt off if it consumed nothing, and reports whether
// the body can go to another node. A nil body (none) always can. A read in
// progress means bytes may be on their way: then it cannot.
func (b *attemptBody) abandon() bool {
	if b == nil {
		return true
	}
	if !b.mu.TryLock() {
		return false
	}
	defer b.mu.Unlock()
	if b.read != 0 {
		return false
	}
	b.dead = true
	return true
}

// next is the body of the following attempt.
func (b *attemptBody) next() *attemptBody { return &attemptBody{mu: b.mu, src: b.src} }

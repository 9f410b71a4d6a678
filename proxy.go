package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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

// maxKeyLen bounds the keys worth asking the Comput3 API about: longer
// ones, or ones holding spaces or control characters, get 401 at once.
const maxKeyLen = 512

type routeKind uint8

const (
	routeOther routeKind = iota // health, errors before a route is known
	routeTag
	routeIndex
	routeWorkloads
	numRouteKinds
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

// forward is the record of one request. ServeHTTP makes it; the
// ReverseProxy hooks and the failover transport find it in the request
// context; the metrics and the access log read it when the request ends.
// All of them run on the handler's goroutine.
type forward struct {
	start     time.Time
	requestID string
	idHeader  []string  // {requestID}, shared by the client's and the node's headers
	route     route     // kind is routeOther until the path parses
	fp        string    // the key's fingerprint, once there is a key
	out       *counting // counts the bytes sent, when the access log is on

	set    *nodeSet    // the tag route's candidates; nil for an index route (no failover)
	base   *url.URL    // the node now chosen
	host   string      // its host
	load   *nodeLoad   // its load, acquired; released when the request ends
	tried  []*nodeLoad // nodes that failed this request
	status int         // what the client got; 0 until the response starts
	ttfb   time.Duration
}

// target points u at the chosen node: its scheme and host, and the rest of
// the path below its base path, with the client's encoding kept.
func (fw *forward) target(u *url.URL) {
	u.Scheme, u.Host = fw.base.Scheme, fw.base.Host
	u.RawPath = strings.TrimSuffix(fw.base.EscapedPath(), "/") + fw.route.rest
	u.Path, _ = url.PathUnescape(u.RawPath) // valid: built from escaped parts
}

type forwardKey struct{}

// counting is the ResponseWriter of a request whose bytes the access log
// reports. Unwrap keeps Flush and Hijack working through it.
type counting struct {
	http.ResponseWriter
	n int64
}

func (c *counting) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *counting) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// token reports whether s is 1 to max bytes of visible ASCII.
func token(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// requestID returns the client's X-Request-Id when it is a sane token,
// and a new random one otherwise.
func requestID(h http.Header) string {
	if id := h.Get("X-Request-Id"); token(id, 128) {
		return id
	}
	var raw [8]byte
	var id [16]byte
	binary.LittleEndian.PutUint64(raw[:], rand.Uint64())
	hex.Encode(id[:], raw[:])
	return string(id[:])
}

// proxy is the HTTP handler of c3-node-proxy.
type proxy struct {
	cache     *cache
	bal       *balancer
	nodes     http.RoundTripper // reaches the nodes
	retries   int               // extra nodes a failed tag request may try
	accessLog bool              // one INFO line per request, not only at DEBUG
	log       *slog.Logger
	rp        *httputil.ReverseProxy
	metrics   requestMetrics
}

func newProxy(c *cache, b *balancer, nodes http.RoundTripper, cfg config, log *slog.Logger) *proxy {
	p := &proxy{cache: c, bal: b, nodes: nodes, retries: cfg.retries, accessLog: cfg.accessLog, log: log}
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
		ModifyResponse: p.received,
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
	fw := pr.In.Context().Value(forwardKey{}).(*forward)
	fw.target(pr.Out.URL)
	// ReverseProxy re-encodes queries it finds unusual; we do not read the
	// query, so the node gets exactly what the client sent.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	pr.Out.Host = ""
	pr.Out.Header["X-Request-Id"] = fw.idHeader
	if prior := pr.In.Header["X-Forwarded-For"]; len(prior) > 0 {
		pr.Out.Header["X-Forwarded-For"] = prior // SetXForwarded appends the client
	}
	pr.SetXForwarded()
}

// received notes the node's response before it is passed on: its status and
// time, who sent it (X-C3-Node), and a body that tells when it breaks.
func (p *proxy) received(res *http.Response) error {
	fw := res.Request.Context().Value(forwardKey{}).(*forward)
	fw.status, fw.ttfb = res.StatusCode, time.Since(fw.start)
	fw.load.countAnswer(res.StatusCode)
	res.Header.Del("X-Request-Id") // the client has ours, which the node got too
	res.Header["X-C3-Node"] = fw.load.hostHeader
	if res.StatusCode != http.StatusSwitchingProtocols {
		res.Body = &nodeBody{ReadCloser: res.Body, ctx: res.Request.Context(), load: fw.load}
	}
	return nil
}

// nodeBody counts a node's response body that broke before its end, unless
// the client leaving broke it.
type nodeBody struct {
	io.ReadCloser
	ctx    context.Context
	load   *nodeLoad
	broken bool
}

func (b *nodeBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && !b.broken && b.ctx.Err() == nil {
		b.broken = true
		b.load.countFailure(failMidStream)
	}
	return n, err
}

// nodeFailed answers 502 when the node could not be reached or failed
// before its response started.
func (p *proxy) nodeFailed(w http.ResponseWriter, r *http.Request, err error) {
	fw := r.Context().Value(forwardKey{}).(*forward)
	err = fmt.Errorf("%w: node %s: %w", errNodeUnreachable, fw.host, err)
	if r.Context().Err() != nil {
		err = fmt.Errorf("%w: %w", context.Canceled, err)
	}
	p.fail(w, r, fw, err)
}

// fail logs err at the level its status deserves and answers it.
func (p *proxy) fail(w http.ResponseWriter, r *http.Request, fw *forward, err error) {
	status := statusOf(err)
	fw.status = status
	switch {
	case status == statusClientClosed:
		p.log.Debug("client went away", "path", r.URL.Path, "request_id", fw.requestID, "err", err)
		return
	case status == http.StatusInternalServerError:
		p.log.Error("internal error", "method", r.Method, "request_id", fw.requestID, "err", err)
	case status == http.StatusBadGateway:
		p.log.Warn("bad gateway", "method", r.Method, "request_id", fw.requestID, "err", err)
	}
	if status == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", "GET, HEAD")
	}
	writeError(w, status, err)
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.EscapedPath()
	if path == "/metrics" {
		p.serveMetrics(w, r)
		return
	}
	fw := &forward{start: time.Now(), requestID: requestID(r.Header)}
	fw.idHeader = []string{fw.requestID}
	w.Header()["X-Request-Id"] = fw.idHeader
	if p.logsRequests(r.Context()) {
		fw.out = &counting{ResponseWriter: w}
		w = fw.out
	}
	defer p.account(r, fw)
	p.serve(w, r, fw, path)
}

func (p *proxy) serve(w http.ResponseWriter, r *http.Request, fw *forward, path string) {
	if path == "/" || path == "/healthz" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			p.fail(w, r, fw, errMethod)
			return
		}
		fw.status = http.StatusOK
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
		return
	}
	key := apiKey(r.Header)
	if key == "" {
		p.fail(w, r, fw, errNoKey)
		return
	}
	if !token(key, maxKeyLen) {
		p.fail(w, r, fw, errBadKey)
		return
	}
	rt, err := parseRoute(path)
	if err != nil {
		p.fail(w, r, fw, err)
		return
	}
	fw.route = rt
	if rt.kind == routeWorkloads && r.Method != http.MethodGet && r.Method != http.MethodHead {
		p.fail(w, r, fw, errMethod)
		return
	}
	e, snap, err := p.cache.get(r.Context(), key, fw.start)
	if err != nil {
		p.fail(w, r, fw, err)
		return
	}
	defer e.done()
	fw.fp = e.fp
	if rt.kind == routeWorkloads {
		fw.status = http.StatusOK
		writeJSON(w, http.StatusOK, snap.workloads)
		return
	}
	p.forward(w, r, e, snap, fw)
}

// forward chooses the node for the request's route, re-fetching the key's
// list once when the route finds nothing in a list that may be stale, and
// proxies r to it.
func (p *proxy) forward(w http.ResponseWriter, r *http.Request, e *entry, snap *snapshot, fw *forward) {
	err := p.choose(snap, fw.route, fw, fw.start)
	if errors.Is(err, errNotFound) {
		if snap, err = p.cache.refetch(r.Context(), e, snap, fw.start); err == nil {
			err = p.choose(snap, fw.route, fw, fw.start)
		}
	}
	if err != nil {
		p.fail(w, r, fw, err)
		return
	}
	if r.ContentLength != 0 {
		// A node may answer before it has read the whole upload. Without
		// this the server would then discard and close the rest of the
		// body while the transport still forwards it, and the transport
		// would tear down the node's connection under the response.
		http.NewResponseController(w).EnableFullDuplex() //nolint:errcheck // HTTP/2 is full duplex already
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
			p.fail(w, r, fw, fmt.Errorf("panic while proxying to %s: %v", fw.host, v))
		}
	}()
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), forwardKey{}, fw)))
}

// finish releases the node a request ended on.
func (p *proxy) finish(fw *forward) { p.bal.release(fw.load) }

// logsRequests reports whether requests get an access log line: at INFO
// with ACCESS_LOG=true, always at DEBUG.
func (p *proxy) logsRequests(ctx context.Context) bool {
	return p.log.Enabled(ctx, slog.LevelDebug) || (p.accessLog && p.log.Enabled(ctx, slog.LevelInfo))
}

// account counts a finished request in the metrics and writes its access
// log line. It runs deferred, also when a broken stream aborts the handler.
func (p *proxy) account(r *http.Request, fw *forward) {
	elapsed := time.Since(fw.start)
	status := fw.status
	if status == 0 {
		status = statusClientClosed // nothing was answered: the client left first
	}
	if fw.ttfb == 0 {
		fw.ttfb = elapsed
	}
	p.metrics.observe(fw.route.kind, status, fw.ttfb, elapsed)
	if fw.out == nil {
		return
	}
	level := slog.LevelDebug
	if p.accessLog {
		level = slog.LevelInfo
	}
	attrs := []slog.Attr{
		slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.String("route", fw.route.kind.String()),
		slog.String("node", fw.host), slog.Int("status", status), slog.Int64("bytes_out", fw.out.n),
		slog.Float64("duration_ms", msec(elapsed)), slog.Float64("ttfb_ms", msec(fw.ttfb)),
		slog.String("key", fw.fp), slog.String("request_id", fw.requestID),
	}
	switch fw.route.kind {
	case routeTag:
		attrs = append(attrs, slog.String("tag", fw.route.tag), slog.Int("tried", len(fw.tried)+1))
	case routeIndex:
		attrs = append(attrs, slog.Int("index", fw.route.index))
	}
	if fw.load != nil {
		attrs = append(attrs, slog.Int64("node_in_flight", fw.load.inFlight.Load()))
	}
	p.log.LogAttrs(r.Context(), level, "request", attrs...)
}

func msec(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

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

// failureReason classifies how a node failed before answering.
func failureReason(err error) failReason {
	var dnsErr *net.DNSError
	var certErr *tls.CertificateVerificationError
	var recordErr tls.RecordHeaderError
	var alert tls.AlertError
	var netErr net.Error
	var opErr *net.OpError
	switch {
	case errors.As(err, &dnsErr):
		return failDNS
	case errors.As(err, &certErr), errors.As(err, &recordErr), errors.As(err, &alert):
		return failTLS
	case errors.As(err, &netErr) && netErr.Timeout():
		return failTimeout
	case errors.As(err, &opErr) && opErr.Op == "dial":
		return failConnect
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return failReset
	}
	return failOther
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
	if req.Body != nil {
		body = &attemptBody{mu: new(sync.Mutex), src: req.Body, left: req.ContentLength}
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
		if cooldown, wentDown := p.bal.failed(fw.load, now, failureReason(err)); wentDown {
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

// attemptBody is the request body as one attempt sees it (golang/go#40747).
//
// The transport reads a body on its own goroutine, and may still read after
// RoundTrip returned: with a Content-Length it reads once more after the
// last byte to check for EOF. By then the node may have answered, the
// server may have closed the inbound body, and that read's error would make
// the transport close the node's connection under the response being
// copied. So the wrapper answers EOF itself once Content-Length bytes went
// through, never touching the inbound body again.
//
// For failover every attempt gets its own view: the one given up is cut
// off, and reads of the shared source are serialised, so no byte can go to
// an abandoned attempt after the next one started. Wrappers are never reused.
type attemptBody struct {
	mu   *sync.Mutex // shared by every attempt of one request; guards src, read and left
	src  io.Reader
	read int64 // bytes this attempt consumed
	left int64 // bytes of the body not yet read; -1 when the length is unknown
	dead bool  // abandoned: reads fail
}

func (b *attemptBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.dead:
		return 0, errAttemptOver
	case b.left == 0:
		return 0, io.EOF
	case b.left > 0 && int64(len(p)) > b.left:
		p = p[:b.left]
	}
	n, err := b.src.Read(p)
	b.read += int64(n)
	if b.left > 0 {
		b.left -= int64(n)
	}
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

// next is the body of the following attempt; it starts where the abandoned
// one stopped, which abandon only allows before any byte was read.
func (b *attemptBody) next() *attemptBody { return &attemptBody{mu: b.mu, src: b.src, left: b.left} }

// durationBuckets are the upper bounds, in seconds, of every histogram:
// from a cached small answer to a long stream.
var durationBuckets = [...]float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}

// histogram is a Prometheus histogram of durations, lock-free.
type histogram struct {
	counts [len(durationBuckets) + 1]atomic.Int64 // per bucket, not cumulative; the last is +Inf
	sumNS  atomic.Int64
}

func (h *histogram) observe(d time.Duration) {
	s, i := d.Seconds(), 0
	for i < len(durationBuckets) && s > durationBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNS.Add(int64(d))
}

// write writes the histogram's series; labels is empty or `k="v",`.
func (h *histogram) write(w io.Writer, name, labels string) {
	var total int64
	for i := range h.counts {
		total += h.counts[i].Load()
		le := "+Inf"
		if i < len(durationBuckets) {
			le = strconv.FormatFloat(durationBuckets[i], 'g', -1, 64)
		}
		fmt.Fprintf(w, "%s_bucket{%sle=\"%s\"} %d\n", name, labels, le, total)
	}
	if labels != "" {
		labels = "{" + strings.TrimSuffix(labels, ",") + "}"
	}
	fmt.Fprintf(w, "%s_sum%s %g\n%s_count%s %d\n", name, labels, float64(h.sumNS.Load())/1e9, name, labels, total)
}

// requestMetrics counts answered requests. Counters are atomics indexed by
// route kind and status: recording takes no lock and allocates nothing.
type requestMetrics struct {
	requests   [numRouteKinds][maxStatus]atomic.Int64
	headerTime [numRouteKinds]histogram // until the response headers
	streamTime [numRouteKinds]histogram // until the end of the body
}

func (m *requestMetrics) observe(kind routeKind, status int, ttfb, total time.Duration) {
	if status >= 0 && status < maxStatus {
		m.requests[kind][status].Add(1)
	}
	m.headerTime[kind].observe(ttfb)
	m.streamTime[kind].observe(total)
}

// label quotes a label value as the exposition format wants.
func label(v string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v) + `"`
}

func help(w io.Writer, name, kind, text string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, kind)
}

// serveMetrics answers GET /metrics in the Prometheus text format 0.0.4.
// Labels carry route kinds, status codes and node hosts, never a key.
func (p *proxy) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		p.fail(w, r, &forward{}, errMethod)
		return
	}
	var b bytes.Buffer
	p.writeMetrics(&b)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	w.Write(b.Bytes())
}

func (p *proxy) writeMetrics(w io.Writer) {
	m := &p.metrics
	help(w, "c3proxy_requests_total", "counter", "Requests answered, by route kind and status code (499: the client left first).")
	for kind := range numRouteKinds {
		for code := range maxStatus {
			if n := m.requests[kind][code].Load(); n > 0 {
				fmt.Fprintf(w, "c3proxy_requests_total{route=%s,code=\"%d\"} %d\n", label(kind.String()), code, n)
			}
		}
	}
	help(w, "c3proxy_request_duration_seconds", "histogram", "Time from the request to the response headers, by route kind.")
	for kind := range numRouteKinds {
		m.headerTime[kind].write(w, "c3proxy_request_duration_seconds", "route="+label(kind.String())+",")
	}
	help(w, "c3proxy_stream_duration_seconds", "histogram", "Time from the request to the end of the response body, by route kind.")
	for kind := range numRouteKinds {
		m.streamTime[kind].write(w, "c3proxy_stream_duration_seconds", "route="+label(kind.String())+",")
	}

	nodes := p.bal.nodes()
	now := time.Now().UnixNano()
	help(w, "c3proxy_node_in_flight", "gauge", "Requests forwarded to the node and not finished.")
	for _, n := range nodes {
		fmt.Fprintf(w, "c3proxy_node_in_flight{node=%s} %d\n", label(n.host), n.inFlight.Load())
	}
	help(w, "c3proxy_node_cooling", "gauge", "1 while tag routing skips the node after repeated failures.")
	for _, n := range nodes {
		cooling := 0
		if n.cooling(now) {
			cooling = 1
		}
		fmt.Fprintf(w, "c3proxy_node_cooling{node=%s} %d\n", label(n.host), cooling)
	}
	help(w, "c3proxy_node_requests_total", "counter", "Responses of the node, by status code.")
	for _, n := range nodes {
		for code := range maxStatus {
			if c := n.answered[code].Load(); c > 0 {
				fmt.Fprintf(w, "c3proxy_node_requests_total{node=%s,code=\"%d\"} %d\n", label(n.host), code, c)
			}
		}
	}
	help(w, "c3proxy_node_failures_total", "counter", "Failures of the node: before its response (connect, dns, tls, reset, timeout, other) or during its body (mid_stream).")
	for _, n := range nodes {
		for reason := range numFailReasons {
			fmt.Fprintf(w, "c3proxy_node_failures_total{node=%s,reason=\"%s\"} %d\n", label(n.host), failReasonNames[reason], n.failed[reason].Load())
		}
	}

	c := p.cache
	help(w, "c3proxy_api_fetches_total", "counter", "Workloads fetches from the Comput3 API, by result.")
	for result := range numFetchResults {
		fmt.Fprintf(w, "c3proxy_api_fetches_total{result=\"%s\"} %d\n", fetchResultNames[result], c.fetches[result].Load())
	}
	help(w, "c3proxy_api_fetch_duration_seconds", "histogram", "Duration of workloads fetches from the Comput3 API.")
	c.fetchSeconds.write(w, "c3proxy_api_fetch_duration_seconds", "")
	help(w, "c3proxy_cached_keys", "gauge", "API keys cached.")
	fmt.Fprintf(w, "c3proxy_cached_keys %d\n", c.size())
	help(w, "c3proxy_routable_nodes", "gauge", "Distinct routable nodes over every cached key.")
	fmt.Fprintf(w, "c3proxy_routable_nodes %d\n", len(c.nodeHosts()))

	help(w, "go_goroutines", "gauge", "Number of goroutines that currently exist.")
	fmt.Fprintf(w, "go_goroutines %d\n", runtime.NumGoroutine())
	if statm, err := os.ReadFile("/proc/self/statm"); err == nil {
		if f := strings.Fields(string(statm)); len(f) > 1 {
			if pages, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				help(w, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
				fmt.Fprintf(w, "process_resident_memory_bytes %d\n", pages*int64(os.Getpagesize()))
			}
		}
	}
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"
)

var (
	errNoKey           = errors.New("missing API key: send X-C3-API-KEY or Authorization: Bearer")
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
	case errors.Is(err, errNoKey), errors.Is(err, errKeyRejected):
		return http.StatusUnauthorized
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
// ReverseProxy hooks, through the request context.
type forward struct {
	base   *url.URL
	host   string
	rest   string
	status int // set by ModifyResponse or ErrorHandler
}

type forwardKey struct{}

// proxy is the HTTP handler of c3-node-proxy.
type proxy struct {
	cache *cache
	bal   *balancer
	log   *slog.Logger
	rp    *httputil.ReverseProxy
}

func newProxy(c *cache, b *balancer, transport http.RoundTripper, log *slog.Logger) *proxy {
	p := &proxy{cache: c, bal: b, log: log}
	p.rp = &httputil.ReverseProxy{
		Rewrite:        rewrite,
		Transport:      transport,
		FlushInterval:  -1, // tokens go out as they come
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ModifyResponse: recordStatus,
		ErrorHandler:   p.nodeFailed,
	}
	return p
}

// rewrite points the outbound request at the chosen node. Method, headers
// (the key included: nodes need it), body and query pass unchanged.
func rewrite(pr *httputil.ProxyRequest) {
	fw := pr.In.Context().Value(forwardKey{}).(*forward)
	out := pr.Out.URL
	out.Scheme, out.Host = fw.base.Scheme, fw.base.Host
	out.RawPath = strings.TrimSuffix(fw.base.EscapedPath(), "/") + fw.rest
	out.Path, _ = url.PathUnescape(out.RawPath) // valid: built from escaped parts
	// ReverseProxy re-encodes queries it finds unusual; we do not read the
	// query, so the node gets exactly what the client sent.
	out.RawQuery = pr.In.URL.RawQuery
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
	load, err := p.choose(snap, rt, fw)
	if errors.Is(err, errNotFound) {
		if snap, err = p.cache.refetch(r.Context(), e, snap, start); err == nil {
			load, err = p.choose(snap, rt, fw)
		}
	}
	if err != nil {
		p.fail(w, r, err)
		return
	}
	defer p.bal.release(load)
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
			"node", fw.host, "in_flight", load.inFlight.Load(), "status", fw.status,
			"duration", time.Since(start), "key", e.fp)
	}
}

// choose picks the node for rt in snap, fills fw with it and returns its
// acquired load.
func (p *proxy) choose(snap *snapshot, rt route, fw *forward) (*nodeLoad, error) {
	if rt.kind == routeIndex {
		if rt.index >= len(snap.indexed.hosts) {
			return nil, fmt.Errorf("%w at index %d (%d routable)", errNotFound, rt.index, len(snap.indexed.hosts))
		}
		fw.base, fw.host = snap.indexed.bases[rt.index], snap.indexed.hosts[rt.index]
		return p.bal.acquire(fw.host), nil
	}
	set := snap.withTag(rt.tag)
	if set == nil {
		return nil, fmt.Errorf("%w with tag %q", errNotFound, rt.tag)
	}
	i, load := p.bal.pickLeastBusy(set.hosts)
	fw.base, fw.host = set.bases[i], set.hosts[i]
	return load, nil
}

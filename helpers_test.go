package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// waitFor polls cond until it holds or within passes.
func waitFor(t *testing.T, within time.Duration, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(within); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("condition not met within %v", within)
		}
	}
}

// syncBuffer collects log output written from many goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// wl builds one workload object as the Comput3 API sends it.
func wl(id, node string, created int64, tags ...string) map[string]any {
	return map[string]any{
		"workload": id, "node": node, "type": "ollama", "status": "running",
		"running": true, "created": created, "expires": created + 3600, "tags": tags,
	}
}

// apiAnswer is what the fake API sends for one key.
type apiAnswer struct {
	status int
	body   string
	delay  <-chan struct{} // if not nil, the answer waits until it is closed
}

// fakeAPI is a Comput3 API: POST /workloads answers per key.
type fakeAPI struct {
	t   testing.TB
	url string

	mu      sync.Mutex
	answers map[string]apiAnswer
	posts   map[string]int
	seen    map[string]bool // every key ever sent, to check that none was logged
	bad     []string        // requests that broke the API's contract
}

func newFakeAPI(t testing.TB) *fakeAPI {
	t.Helper()
	a := &fakeAPI{t: t, answers: map[string]apiAnswer{}, posts: map[string]int{}, seen: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	a.url = srv.URL + "/api/v0"
	t.Cleanup(func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		for _, b := range a.bad {
			t.Errorf("fake API got a bad request: %s", b)
		}
	})
	return a
}

func (a *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("X-C3-API-KEY")
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.seen[key] = true
	switch {
	case r.Method != http.MethodPost || r.URL.Path != "/api/v0/workloads":
		a.bad = append(a.bad, r.Method+" "+r.URL.Path)
	case r.Header.Get("Content-Type") != "application/json" || r.Header.Get("Accept") != "application/json":
		a.bad = append(a.bad, fmt.Sprintf("headers %v", r.Header))
	case !jsonEqual(body, `{"running": true}`):
		a.bad = append(a.bad, "body "+string(body))
	}
	a.posts[key]++
	ans, ok := a.answers[key]
	a.mu.Unlock()
	if !ok {
		ans = apiAnswer{status: http.StatusUnauthorized, body: `{"error":"invalid key"}`}
	}
	if ans.delay != nil {
		select {
		case <-ans.delay:
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(ans.status)
	io.WriteString(w, ans.body)
}

func jsonEqual(got []byte, want string) bool {
	var g, w any
	return json.Unmarshal(got, &g) == nil && json.Unmarshal([]byte(want), &w) == nil &&
		fmt.Sprint(g) == fmt.Sprint(w)
}

// set makes the API answer key with these workloads.
func (a *fakeAPI) set(key string, workloads ...map[string]any) {
	body, err := json.Marshal(workloads)
	if err != nil {
		a.t.Fatal(err)
	}
	if workloads == nil {
		body = []byte("[]")
	}
	a.answer(key, apiAnswer{status: http.StatusOK, body: string(body)})
}

func (a *fakeAPI) answer(key string, ans apiAnswer) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.answers[key] = ans
}

func (a *fakeAPI) postsFor(key string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.posts[key]
}

func (a *fakeAPI) keys() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var keys []string
	for k := range a.seen {
		keys = append(keys, k)
	}
	return keys
}

// seenRequest is what a fake node received.
type seenRequest struct {
	method, uri, host string
	header            http.Header
	body              []byte
}

// fakeNode is a GPU node: by default it answers 200 with its name in the
// body and in X-Node, and records every request.
type fakeNode struct {
	name   string
	srv    *httptest.Server
	host   string // host:port
	hits   atomic.Int64
	mu     sync.Mutex
	seen   []seenRequest
	handle http.HandlerFunc // optional: replaces the default answer
}

func newNode(t testing.TB, name string, tlsNode bool, handle http.HandlerFunc) *fakeNode {
	t.Helper()
	n := &fakeNode{name: name, handle: handle}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.hits.Add(1)
		if n.handle != nil {
			n.handle(w, r)
			return
		}
		body, _ := io.ReadAll(r.Body)
		n.mu.Lock()
		n.seen = append(n.seen, seenRequest{r.Method, r.RequestURI, r.Host, r.Header.Clone(), body})
		n.mu.Unlock()
		w.Header().Set("X-Node", name)
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, name)
	})
	if tlsNode {
		n.srv = httptest.NewTLSServer(h)
	} else {
		n.srv = httptest.NewServer(h)
	}
	t.Cleanup(n.srv.Close)
	n.host = strings.TrimPrefix(strings.TrimPrefix(n.srv.URL, "http://"), "https://")
	return n
}

func (n *fakeNode) last(t *testing.T) seenRequest {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.seen) == 0 {
		t.Fatalf("node %s got no request", n.name)
	}
	return n.seen[len(n.seen)-1]
}

var (
	testCertOnce sync.Once
	testCerts    *x509.CertPool
)

// testCertPool trusts the certificate every httptest TLS server uses.
func testCertPool() *x509.CertPool {
	testCertOnce.Do(func() {
		srv := httptest.NewTLSServer(http.NotFoundHandler())
		defer srv.Close()
		testCerts = x509.NewCertPool()
		testCerts.AddCert(srv.Certificate())
	})
	return testCerts
}

// harness is a running proxy: the real handler served on a real socket.
type harness struct {
	url    string
	p      *proxy
	api    *fakeAPI
	logs   *syncBuffer
	client *http.Client
}

type option func(*config, *proxy)

func withConfig(f func(*config)) option { return func(c *config, _ *proxy) { f(c) } }

// startProxy serves a proxy in front of api on 127.0.0.1 until the test ends.
func startProxy(t *testing.T, api *fakeAPI, opts ...option) *harness {
	t.Helper()
	cfg, err := loadConfig(func(name string) string {
		return map[string]string{
			"API_URL": api.url, "NODE_SCHEME": "http", "LOG_LEVEL": "debug",
			"REFRESH_INTERVAL": "1h", "IDLE_TIMEOUT": "1h", "SHUTDOWN_TIMEOUT": "5s",
		}[name]
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range opts {
		o(&cfg, nil)
	}
	logs := &syncBuffer{}
	log := newLogger(logs, cfg)
	nodes := newNodeTransport()
	nodes.TLSClientConfig = &tls.Config{RootCAs: testCertPool()}
	p := newProxy(newCache(cfg.apiURL, newAPIClient(cfg), cfg, log), newBalancer(), nodes, cfg, log)
	for _, o := range opts {
		o(&cfg, p)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, cfg, ln, p, log) }()

	h := &harness{url: "http://" + ln.Addr().String(), p: p, api: api, logs: logs,
		client: &http.Client{Transport: &http.Transport{}}}
	t.Cleanup(func() {
		h.client.CloseIdleConnections()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		nodes.CloseIdleConnections()
		out := logs.String()
		for _, key := range api.keys() {
			if key != "" && strings.Contains(out, key) {
				t.Errorf("the key %q appears in the log", key)
			}
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", out)
		}
	})
	return h
}

// do sends a request with key (none when empty) and returns the response
// with its body read.
func (h *harness) do(t *testing.T, method, path, key string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, h.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("X-C3-API-KEY", key)
	}
	return h.send(t, req)
}

func (h *harness) send(t *testing.T, req *http.Request) (*http.Response, string) {
	t.Helper()
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", req.Method, req.URL, err)
	}
	return res, string(b)
}

// get is do for a GET that must answer want; it returns the body.
func (h *harness) get(t *testing.T, path, key string, want int) string {
	t.Helper()
	res, body := h.do(t, http.MethodGet, path, key, nil)
	if res.StatusCode != want {
		t.Fatalf("GET %s: got status %d, want %d; body %s", path, res.StatusCode, want, body)
	}
	return body
}

// errorBody decodes {"error": "..."} and checks the content type.
func errorBody(t *testing.T, res *http.Response, body string) string {
	t.Helper()
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error content type: got %q, want application/json", ct)
	}
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
		t.Fatalf("error body %q is not {\"error\": \"...\"}: %v", body, err)
	}
	return e.Error
}

// inFlight reports the requests in flight on a node.
func (h *harness) inFlight(n *fakeNode) int64 { return h.p.bal.inFlight(n.host) }

// waitIdle waits until no request is in flight on any of nodes.
func (h *harness) waitIdle(t *testing.T, nodes ...*fakeNode) {
	t.Helper()
	waitFor(t, 5*time.Second, func() bool {
		for _, n := range nodes {
			if h.inFlight(n) != 0 {
				return false
			}
		}
		return true
	})
}

func (h *harness) cachedKeys() int { return h.p.cache.size() }

var errTimeout = errors.New("timed out")

// within runs f in a goroutine and returns its error, or errTimeout after d.
func within(d time.Duration, f func() error) error {
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		return errTimeout
	}
}

// inFlight reports the requests in flight on host (0 for an unknown host).
func (b *balancer) inFlight(host string) int64 {
	if n := (*b.loads.Load())[host]; n != nil {
		return n.inFlight.Load()
	}
	return 0
}

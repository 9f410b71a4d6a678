package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// echoNode answers with its name in X-Node and echoes the request body,
// read whole first (HTTP/1 handlers cannot answer while still reading).
func echoNode(t *testing.T, name string) *fakeNode {
	return newNode(t, name, false, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("node %s: reading the body: %v", name, err)
		}
		w.Header().Set("X-Node", name)
		w.Write(body)
	})
}

// resetNode reads the request headers, then drops the connection without
// answering: a node failing before its response.
func resetNode(t *testing.T, name string) *fakeNode {
	return newNode(t, name, false, func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST, not FIN
			}
			conn.Close()
		}
	})
}

// refusedNode is the address of a port that nothing listens on.
func refusedNode(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// badCertNode is a TLS node whose self-signed certificate nobody trusts.
func badCertNode(t *testing.T) *fakeNode {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "impostor"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	n := &fakeNode{name: "impostor"}
	n.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.hits.Add(1)
		io.WriteString(w, "impostor")
	}))
	n.srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	n.srv.Config.ErrorLog = nil
	n.srv.StartTLS()
	t.Cleanup(n.srv.Close)
	n.host = strings.TrimPrefix(n.srv.URL, "https://")
	return n
}

func TestFailoverOnTagRoutes(t *testing.T) {
	tests := []struct {
		name     string
		bad      func(t *testing.T) string // the failing node, as the API lists it
		bodyLost bool                      // the node consumed the body before failing: no retry
	}{
		{"connection refused", func(t *testing.T) string { return "http://" + refusedNode(t) }, false},
		{"bad TLS certificate", func(t *testing.T) string { return "https://" + badCertNode(t).host }, false},
		{"reset before headers", func(t *testing.T) string { return "http://" + resetNode(t, "reset").host }, true},
		// The dialer below fails this name as a resolver would: no lookup leaves the machine.
		{"DNS failure", func(t *testing.T) string { return "http://unresolvable.node.test:80" }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			api := newFakeAPI(t)
			good := echoNode(t, "good")
			bad := tc.bad(t)
			const key = "key-failover-01"
			api.set(key, wl("w-bad", bad, 1, "t"), wl("w-good", "http://"+good.host, 2, "t"))
			h := startProxy(t, api, func(_ *config, p *proxy) {
				if p == nil {
					return
				}
				tr := p.nodes.(*http.Transport)
				dial := tr.DialContext
				tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
					if strings.HasPrefix(addr, "unresolvable.") {
						host, _, _ := net.SplitHostPort(addr)
						return nil, &net.OpError{Op: "dial", Net: network, Err: &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}}
					}
					return dial(ctx, network, addr)
				}
			})

			for i := range 12 {
				for _, size := range []int{0, 100, 64 << 10, 1 << 20} {
					payload := strings.Repeat(strconv.Itoa(i%10), size)
					method := http.MethodPost
					if size == 0 {
						method = http.MethodGet
					}
					res, body := h.do(t, method, "/tags/t/x", key, strings.NewReader(payload))
					switch {
					case res.StatusCode == 200 && res.Header.Get("X-Node") == "good" && body == payload:
					case res.StatusCode == 502 && tc.bodyLost && size > 0:
						// The node read the body before failing: sending it elsewhere would
						// lose what was read. 502 is the correct answer.
					default:
						t.Fatalf("%s %d bytes: got %d from %q (%d bytes back)", method, size, res.StatusCode, res.Header.Get("X-Node"), len(body))
					}
				}
			}
			if !strings.Contains(h.logs.String(), "node marked down") {
				t.Errorf("the failing node was never marked down")
			}
			// An index route names its node: no failover.
			res, body := h.do(t, http.MethodGet, "/0/x", key, nil)
			if res.StatusCode != http.StatusBadGateway {
				t.Fatalf("index route to the failing node: got %d, want 502", res.StatusCode)
			}
			if msg := errorBody(t, res, body); !strings.Contains(msg, strings.SplitN(bad, "://", 2)[1]) {
				t.Errorf("502 %q does not name the node", msg)
			}
			h.waitIdle(t, good)
			if n := h.p.bal.inFlight(strings.SplitN(bad, "://", 2)[1]); n != 0 {
				t.Errorf("failing node: in flight %d", n)
			}
		})
	}
}

func TestRetriesAreBoundedAndNeverRepeatANode(t *testing.T) {
	for _, retries := range []int{0, 2, 5} {
		t.Run(fmt.Sprint("RETRIES=", retries), func(t *testing.T) {
			api := newFakeAPI(t)
			var nodes []*fakeNode
			var ws []map[string]any
			for i := range 4 {
				n := resetNode(t, fmt.Sprint("r", i))
				nodes = append(nodes, n)
				ws = append(ws, wl(fmt.Sprint("w", i), n.host, int64(i), "t"))
			}
			const key = "key-retries-001"
			api.set(key, ws...)
			h := startProxy(t, api, withConfig(func(c *config) { c.retries = retries }))

			res, body := h.do(t, http.MethodGet, "/tags/t/x", key, nil)
			if res.StatusCode != http.StatusBadGateway {
				t.Fatalf("got %d, want 502", res.StatusCode)
			}
			errorBody(t, res, body)
			var total int64
			for _, n := range nodes {
				if hits := n.hits.Load(); hits > 1 {
					t.Errorf("node %s tried %d times", n.name, hits)
				}
				total += n.hits.Load()
			}
			if want := int64(min(retries+1, len(nodes))); total != want {
				t.Errorf("%d attempts, want %d", total, want)
			}
			h.waitIdle(t, nodes...)
		})
	}
}

func TestPassiveHealth(t *testing.T) {
	api := newFakeAPI(t)
	var healthy atomic.Bool
	flaky := func(name string) *fakeNode {
		return newNode(t, name, false, func(w http.ResponseWriter, r *http.Request) {
			if !healthy.Load() {
				conn, _, _ := http.NewResponseController(w).Hijack()
				conn.Close()
				return
			}
			w.Header().Set("X-Node", name)
			io.WriteString(w, name)
		})
	}
	a, b := flaky("a"), flaky("b")
	const key = "key-health-0001"
	api.set(key, wl("wa", a.host, 1, "t"), wl("wb", b.host, 2, "t"))
	h := startProxy(t, api)

	// Three failures in a row each: a first, then b.
	for _, path := range []string{"/0/x", "/0/x", "/0/x", "/1/x", "/1/x", "/1/x"} {
		h.get(t, path, key, http.StatusBadGateway)
	}
	if got := strings.Count(h.logs.String(), "node marked down"); got != 2 {
		t.Fatalf("%d nodes marked down, want 2", got)
	}
	// Both are cooling down; the tag route still tries one rather than
	// answer 502, and it picks the one that failed longest ago.
	healthy.Store(true)
	hitsA, hitsB := a.hits.Load(), b.hits.Load()
	if got := h.get(t, "/tags/t/x", key, 200); got != "a" {
		t.Fatalf("with every node cooling, got %q, want the least recently failed a", got)
	}
	if a.hits.Load() != hitsA+1 || b.hits.Load() != hitsB {
		t.Errorf("cooling nodes were tried more than needed")
	}
	if !strings.Contains(h.logs.String(), "node back up") {
		t.Errorf("recovery not logged")
	}
	// a is back; b is still cooling, so every tag request goes to a.
	for range 6 {
		if got := h.get(t, "/tags/t/x", key, 200); got != "a" {
			t.Fatalf("got %q while b cools down", got)
		}
	}
	// An index route reaches b anyway; its success brings it back.
	h.get(t, "/1/x", key, 200)
	counts := map[string]int{}
	for range 6 {
		counts[h.get(t, "/tags/t/x", key, 200)]++
	}
	if counts["a"] != 3 || counts["b"] != 3 {
		t.Errorf("after both recovered: %v, want 3 each", counts)
	}
}

func TestHealthCooldownDoubles(t *testing.T) {
	b := newBalancer()
	n := b.load("n:1")
	now := time.Unix(1000, 0)
	var got []time.Duration
	var wentDown []bool
	for range 9 {
		cd, down := b.failed(n, now, failReset)
		got = append(got, cd)
		wentDown = append(wentDown, down)
	}
	want := []time.Duration{0, 0, 5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second, 60 * time.Second, 60 * time.Second, 60 * time.Second}
	for i := range want {
		if got[i] != want[i] || wentDown[i] != (i == 2) {
			t.Fatalf("failure %d: cooldown %v (went down %v), want %v (%v)", i+1, got[i], wentDown[i], want[i], i == 2)
		}
	}
	if _, p := b.pickLeastBusy([]string{"n:1", "m:1"}, now, nil); p.host != "m:1" {
		t.Errorf("a cooling node was picked over a healthy one")
	}
	if _, p := b.pickLeastBusy([]string{"n:1", "m:1"}, now.Add(61*time.Second), nil); p == nil {
		t.Errorf("nothing picked after the cooldown")
	}
	if !b.succeeded(n) || b.succeeded(n) || n.failures.Load() != 0 {
		t.Errorf("one success must clear the failures once")
	}
	if _, down := b.failed(n, now, failReset); down {
		t.Errorf("the first failure after a success took the node down")
	}
}

func TestHangingAPI(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	gate := make(chan struct{})
	defer close(gate)
	const cold, warm = "key-hangcold-01", "key-hangwarm-01"
	api.answer(cold, apiAnswer{status: 200, body: "[]", delay: gate})
	api.set(warm, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.apiTimeout = 200 * time.Millisecond
		c.refreshInterval = 30 * time.Millisecond
	}))

	res, body := h.do(t, http.MethodGet, "/0/x", cold, nil)
	if res.StatusCode != http.StatusBadGateway {
		t.Fatalf("cold key with a hanging API: got %d, want 502", res.StatusCode)
	}
	errorBody(t, res, body)

	h.get(t, "/0/x", warm, 200)
	body2, _ := io.ReadAll(strings.NewReader("[]"))
	api.answer(warm, apiAnswer{status: 200, body: string(body2), delay: gate})
	calls := api.postsFor(warm)
	waitFor(t, 10*time.Second, func() bool { return api.postsFor(warm) >= calls+2 })
	if got := h.get(t, "/0/x", warm, 200); got != "n" {
		t.Fatalf("warm key with a hanging API: got %q, want the cached node", got)
	}
	if !strings.Contains(h.logs.String(), "deadline exceeded") {
		t.Errorf("the timeout is not the reason logged")
	}
}

func TestOversizedAPIAnswer(t *testing.T) {
	api := newFakeAPI(t)
	const key = "key-oversize-01"
	api.answer(key, apiAnswer{status: 200, body: "[" + strings.Repeat(" ", maxWorkloadsBody) + "]"})
	h := startProxy(t, api)
	res, body := h.do(t, http.MethodGet, "/workloads", key, nil)
	if res.StatusCode != http.StatusBadGateway {
		t.Fatalf("got %d, want 502", res.StatusCode)
	}
	if msg := errorBody(t, res, body); !strings.Contains(msg, "larger than") {
		t.Errorf("message %q does not give the reason", msg)
	}
}

func TestAPIConcurrencyIsBounded(t *testing.T) {
	api := newFakeAPI(t)
	gate := make(chan struct{})
	var now, peak atomic.Int64
	counting := func(w http.ResponseWriter, r *http.Request) {
		if n := now.Add(1); n > peak.Load() {
			peak.Store(n)
		}
		<-gate
		now.Add(-1)
		w.Write([]byte("[]"))
	}
	srv := httptest.NewServer(http.HandlerFunc(counting))
	t.Cleanup(srv.Close)
	h := startProxy(t, api, withConfig(func(c *config) {
		c.apiConcurrency = 3
		c.apiURL, _ = c.apiURL.Parse(srv.URL + "/api/v0")
	}))

	var wg sync.WaitGroup
	for i := range 12 {
		wg.Go(func() { h.do(t, http.MethodGet, "/workloads", fmt.Sprintf("key-conc-%06d", i), nil) })
	}
	waitFor(t, 5*time.Second, func() bool { return now.Load() == 3 })
	if got := h.cachedKeys(); got != 12 {
		t.Fatalf("%d keys waiting, want 12", got)
	}
	close(gate)
	wg.Wait()
	if got := peak.Load(); got != 3 {
		t.Fatalf("peak concurrent API calls %d, want 3", got)
	}
}

func TestRejectedKeysAreRemembered(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	h := startProxy(t, api, func(_ *config, p *proxy) {
		if p != nil {
			p.cache.rejectFor = 300 * time.Millisecond
		}
	})
	const bad = "key-rejected-01"
	for range 10 {
		h.get(t, "/0/x", bad, http.StatusUnauthorized)
	}
	if got := api.postsFor(bad); got != 1 {
		t.Fatalf("10 requests with a rejected key cost %d API calls, want 1", got)
	}
	// The key becomes valid; after the window it is asked about again.
	api.set(bad, wl("w1", node.host, 1))
	waitFor(t, 5*time.Second, func() bool {
		res, _ := h.do(t, http.MethodGet, "/0/x", bad, nil)
		return res.StatusCode == 200
	})
	if got := api.postsFor(bad); got != 2 {
		t.Fatalf("API calls: got %d, want 2", got)
	}
}

func TestMalformedKeysCostNoAPICall(t *testing.T) {
	api := newFakeAPI(t)
	h := startProxy(t, api)
	tests := []struct {
		header string
		status []int // the server itself answers 400 to control characters
	}{
		{"X-C3-API-KEY: key with-space", []int{401}},
		{"X-C3-API-KEY: key\twith-tab", []int{401}},
		{"X-C3-API-KEY: " + strings.Repeat("k", maxKeyLen+1), []int{401}},
		{"Authorization: Bearer a\tb", []int{401}},
		{"Authorization: Bearer two words", []int{401}},
		{"X-C3-API-KEY: key\x01ctrl", []int{400, 401}},
		{"X-C3-API-KEY: key\x7fdel", []int{400, 401}},
	}
	for _, tc := range tests {
		status, _ := rawRequest(t, h, "GET /0/x HTTP/1.1\r\nHost: p\r\n"+tc.header+"\r\n\r\n")
		if !slices.Contains(tc.status, status) {
			t.Errorf("%q: got %d, want %v", tc.header, status, tc.status)
		}
	}
	if keys := api.keys(); len(keys) != 0 {
		t.Fatalf("malformed keys reached the API: %d calls", len(keys))
	}
	// The longest acceptable key is asked about.
	h.get(t, "/0/x", strings.Repeat("k", maxKeyLen), http.StatusUnauthorized)
	if got := api.postsFor(strings.Repeat("k", maxKeyLen)); got != 1 {
		t.Fatalf("a %d-byte key: %d API calls, want 1", maxKeyLen, got)
	}
}

func TestKeyCap(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const maxKeys = 5
	h := startProxy(t, api, withConfig(func(c *config) { c.maxKeys = maxKeys }))
	keys := make([]string, 20)
	for i := range keys {
		keys[i] = fmt.Sprintf("key-cap-%07d", i)
		api.set(keys[i], wl("w", node.host, 1))
	}
	for _, k := range keys {
		h.get(t, "/0/x", k, 200)
		if got := h.cachedKeys(); got > maxKeys {
			t.Fatalf("%d keys cached, cap %d", got, maxKeys)
		}
	}
	// The most recent keys stayed; the oldest went.
	for _, k := range keys[len(keys)-maxKeys:] {
		h.get(t, "/0/x", k, 200)
		if got := api.postsFor(k); got != 1 {
			t.Errorf("a recent key was evicted (%d calls)", got)
		}
	}
	h.get(t, "/0/x", keys[0], 200)
	if got := api.postsFor(keys[0]); got != 2 {
		t.Errorf("the least recently used key: %d calls, want 2 (evicted, then fetched again)", got)
	}

	t.Run("every key busy", func(t *testing.T) {
		release := make(chan struct{})
		stream := streamingNode(t, "text/event-stream", []string{"data: 1\n\n"}, nil, release)
		api := newFakeAPI(t)
		api.set("key-busy-000001", wl("w", stream.host, 1))
		api.set("key-busy-000002", wl("w", stream.host, 1))
		h := startProxy(t, api, withConfig(func(c *config) { c.maxKeys = 1 }))
		req, _ := http.NewRequest(http.MethodGet, h.url+"/0/s", nil)
		req.Header.Set("X-C3-API-KEY", "key-busy-000001")
		res, err := h.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		res2, body := h.do(t, http.MethodGet, "/0/s", "key-busy-000002", nil)
		if res2.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("a new key while the only slot streams: got %d, want 503", res2.StatusCode)
		}
		errorBody(t, res2, body)
		close(release)
		io.ReadAll(res.Body)
	})
}

// peakRSS reads the process's peak resident memory (VmHWM) in KiB.
func peakRSS() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// TestKeyFlood sends FLOOD_KEYS (default 5000) distinct made-up keys, twice
// each: every key costs one API call at most, and the cache stays bounded.
func TestKeyFlood(t *testing.T) {
	n := 5000
	if v, err := strconv.Atoi(os.Getenv("FLOOD_KEYS")); err == nil && v > 0 {
		n = v
	}
	api := newFakeAPI(t)
	const maxKeys = 100
	h := startProxy(t, api, withConfig(func(c *config) {
		c.maxKeys = maxKeys
		c.logLevel = 100 // nothing: 2n requests would fill the log
	}))
	h.logs = &syncBuffer{}
	node := newNode(t, "n", false, nil)
	for i := range n / 10 { // one key in ten is real
		api.set(fmt.Sprintf("flood-%08d", i*10), wl("w", node.host, 1))
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 32}}
	defer client.CloseIdleConnections()
	rssBefore := peakRSS()
	start := time.Now()
	var wg sync.WaitGroup
	var wrong atomic.Int64
	var maxCached atomic.Int64
	work := make(chan int)
	for range 32 {
		wg.Go(func() {
			for i := range work {
				key := fmt.Sprintf("flood-%08d", i%n)
				req, _ := http.NewRequest(http.MethodGet, h.url+"/0/x", nil)
				req.Header.Set("X-C3-API-KEY", key)
				res, err := client.Do(req)
				if err != nil {
					wrong.Add(1)
					continue
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if want := map[bool]int{true: 200, false: 401}[(i%n)%10 == 0]; res.StatusCode != want {
					wrong.Add(1)
				}
				if c := int64(h.cachedKeys()); c > maxCached.Load() {
					maxCached.Store(c)
				}
			}
		})
	}
	for i := range 2 * n {
		work <- i
	}
	close(work)
	wg.Wait()
	calls := 0
	for _, k := range api.keys() {
		calls += api.postsFor(k)
	}
	t.Logf("%d distinct keys, %d requests in %v: %d API calls, at most %d keys cached, %d rejected remembered, peak RSS %d MiB (was %d MiB)",
		n, 2*n, time.Since(start).Round(time.Millisecond), calls, maxCached.Load(), len(h.p.cache.rejected), peakRSS()>>10, rssBefore>>10)
	if wrong.Load() != 0 {
		t.Errorf("%d requests got a wrong answer", wrong.Load())
	}
	// Real keys beyond the cap may be evicted and fetched again; made-up
	// keys are asked about once.
	if rejectedCalls := calls - api.realCalls("flood-"); rejectedCalls > n-n/10 {
		t.Errorf("made-up keys cost %d API calls, want at most %d", rejectedCalls, n-n/10)
	}
	if maxCached.Load() > maxKeys {
		t.Errorf("%d keys cached, cap %d", maxCached.Load(), maxKeys)
	}
}

// realCalls counts the API calls for keys the API knows.
func (a *fakeAPI) realCalls(prefix string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	calls := 0
	for k, n := range a.posts {
		if _, ok := a.answers[k]; ok && strings.HasPrefix(k, prefix) {
			calls += n
		}
	}
	return calls
}

func TestSlowClients(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-slowloris-1"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.readHeaderTimeout = 300 * time.Millisecond
		c.idleConnTimeout = 300 * time.Millisecond
	}))
	addr := strings.TrimPrefix(h.url, "http://")
	h.get(t, "/0/x", key, 200)
	h.client.CloseIdleConnections()
	baseline := runtime.NumGoroutine()

	const conns = 30
	closed := make(chan error, conns)
	for i := range conns {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		go func() {
			switch i % 3 {
			case 0: // sends nothing at all
			case 1: // trickles a header line by line, forever
				io.WriteString(conn, "GET /0/x HTTP/1.1\r\nHost: p\r\n")
				go func() {
					for range 100 {
						if _, err := io.WriteString(conn, "X-Slow: 1\r\n"); err != nil {
							return
						}
						time.Sleep(50 * time.Millisecond)
					}
				}()
			case 2: // one request, then keeps the connection idle
				fmt.Fprintf(conn, "GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
			}
			// The server must close the connection by itself.
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.Copy(io.Discard, conn)
			closed <- err
		}()
	}
	for range conns {
		if err := <-closed; err != nil {
			t.Fatalf("a slow connection was not closed by the server: %v", err)
		}
	}
	waitFor(t, 5*time.Second, func() bool { return runtime.NumGoroutine() <= baseline+2 })

	t.Run("oversized headers get 431", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, h.url+"/0/x", nil)
		req.Header.Set("X-C3-API-KEY", key)
		req.Header.Set("X-Huge", strings.Repeat("h", 2*maxHeaderBytes))
		res, err := h.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("got %d, want 431", res.StatusCode)
		}
	})
}

func TestClientThatStopsReadingBlocksNoOne(t *testing.T) {
	api := newFakeAPI(t)
	chunk := strings.Repeat("x", 32<<10)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/firehose" {
			io.WriteString(w, "quick")
			return
		}
		for range 4096 { // 128 MiB, far more than any socket buffers hold
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
		}
	})
	const key = "key-stalled-001"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api)

	conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET /0/firehose HTTP/1.1\r\nHost: p\r\nX-C3-API-KEY: %s\r\n\r\n", key)
	br := bufio.NewReader(conn)
	if _, err := http.ReadResponse(br, nil); err != nil {
		t.Fatal(err)
	}
	// ... and reads no more. Others are served meanwhile.
	for range 20 {
		if got := h.get(t, "/0/quick", key, 200); got != "quick" {
			t.Fatalf("got %q", got)
		}
	}
	if h.inFlight(node) != 1 {
		t.Errorf("the stalled stream: in flight %d, want 1", h.inFlight(node))
	}
	conn.Close()
	h.waitIdle(t, node)
}

// TestNodeDiesMidStreamAffectsNoOther kills a node in the middle of a
// stream: that client sees a broken stream, a stream on another node goes
// on, and the counts return to 0.
func TestNodeDiesMidStreamAffectsNoOther(t *testing.T) {
	api := newFakeAPI(t)
	killed := make(chan struct{})
	release := make(chan struct{})
	dying := newNode(t, "dying", false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: 1\n\n")
		http.NewResponseController(w).Flush()
		<-killed
	})
	steady := streamingNode(t, "text/event-stream", []string{"data: 1\n\n"}, []string{"data: 2\n\n"}, release)
	const key = "key-middeath-01"
	api.set(key, wl("w1", dying.host, 1), wl("w2", steady.host, 2))
	h := startProxy(t, api)

	open := func(path string) (*http.Response, *bufio.Reader) {
		req, _ := http.NewRequest(http.MethodGet, h.url+path, nil)
		req.Header.Set("X-C3-API-KEY", key)
		res, err := h.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(res.Body)
		if line, err := br.ReadString('\n'); err != nil || line != "data: 1\n" {
			t.Fatalf("%s: first event %q, %v", path, line, err)
		}
		return res, br
	}
	resDying, brDying := open("/0/s")
	defer resDying.Body.Close()
	resSteady, brSteady := open("/1/s")
	defer resSteady.Body.Close()

	dying.srv.CloseClientConnections()
	close(killed)
	if _, err := io.ReadAll(brDying); err == nil {
		t.Fatalf("the client of a dead node saw a clean end")
	}
	close(release)
	rest, err := io.ReadAll(brSteady)
	if err != nil || !strings.Contains(string(rest), "data: 2") {
		t.Fatalf("the other stream: %q, %v", rest, err)
	}
	h.waitIdle(t, dying, steady)
}

// pastTheEnd fails any read: a body read after its last byte reaches it.
type pastTheEnd struct{}

func (pastTheEnd) Read([]byte) (int, error) { return 0, errors.New("read past Content-Length") }

// TestBodyEndsAtItsLength checks the golang/go#40747 guard: once
// Content-Length bytes went through, the transport's EOF check is answered
// without reading the inbound body, which the server may have closed.
func TestBodyEndsAtItsLength(t *testing.T) {
	b := &attemptBody{mu: new(sync.Mutex), src: io.MultiReader(strings.NewReader("0123456789"), pastTheEnd{}), left: 10}
	got, err := io.ReadAll(b)
	if err != nil || string(got) != "0123456789" {
		t.Fatalf("got %q, %v; want the 10 bytes and a clean EOF", got, err)
	}
	if n, err := b.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("another read: %d, %v; want 0, EOF", n, err)
	}
	// Unknown length (chunked): read to the source's own end.
	b = &attemptBody{mu: new(sync.Mutex), src: strings.NewReader("abc"), left: -1}
	if got, err := io.ReadAll(b); err != nil || string(got) != "abc" {
		t.Fatalf("chunked: got %q, %v", got, err)
	}
}

// TestNodeAnswersBeforeTheUploadEnds: a node answers after the first KiB
// of an upload, and the client sends the rest only once it has the answer's
// headers (a full-duplex client). The whole answer must arrive, on every route.
func TestNodeAnswersBeforeTheUploadEnds(t *testing.T) {
	api := newFakeAPI(t)
	answer := strings.Repeat("r", 256<<10)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		io.ReadFull(r.Body, make([]byte, 1024))
		http.NewResponseController(w).EnableFullDuplex()
		w.Header().Set("Content-Length", strconv.Itoa(len(answer)))
		io.WriteString(w, answer)
		io.Copy(io.Discard, r.Body)
	})
	const key = "key-earlyanswer"
	api.set(key, wl("w1", node.host, 1, "t"))
	h := startProxy(t, api)

	for _, path := range []string{"/tags/t/upload", "/0/upload"} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		const size = 100 << 10
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: p\r\nX-C3-API-KEY: %s\r\nContent-Length: %d\r\n\r\n", path, key, size)
		conn.Write(make([]byte, size/2))
		br := bufio.NewReader(conn)
		var res *http.Response
		if err := within(10*time.Second, func() (err error) { res, err = http.ReadResponse(br, nil); return err }); err != nil {
			t.Fatalf("%s: no answer before the upload ended: %v", path, err)
		}
		conn.Write(make([]byte, size-size/2))
		got, err := io.ReadAll(res.Body)
		if res.StatusCode != 200 || err != nil || len(got) != len(answer) {
			t.Fatalf("%s: status %d, %d of %d bytes, %v", path, res.StatusCode, len(got), len(answer), err)
		}
	}
	h.waitIdle(t, node)
}

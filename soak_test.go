package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
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

// soakNode echoes bodies and streams events, and fails at random: it drops
// 4% of requests before answering and breaks 2% of streams half way.
func soakNode(t *testing.T, name string) *fakeNode {
	return newNode(t, name, false, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		fail := rand.IntN(100)
		if fail < 4 {
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			}
			return
		}
		w.Header().Set("X-Node", name)
		if r.URL.Path != "/stream" {
			w.Write(body)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range 5 {
			fmt.Fprintf(w, "data: %s %d\n\n", name, i)
			rc.Flush()
			if i == 2 && fail < 6 {
				if conn, _, err := rc.Hijack(); err == nil {
					conn.Close()
				}
				return
			}
		}
	})
}

// TestSoak sends SOAK_REQUESTS (default 20 000) mixed requests from 32
// clients over three keys with three nodes each, with random node failures
// and 10% of the clients hanging up early, then checks every answer, that
// every in-flight count is back to 0 and that no goroutine leaked.
func TestSoak(t *testing.T) {
	total := 20000
	if v, err := strconv.Atoi(os.Getenv("SOAK_REQUESTS")); err == nil && v > 0 {
		total = v
	}
	if testing.Short() {
		total = 2000
	}
	api := newFakeAPI(t)
	keys := []string{"key-soak-alpha1", "key-soak-bravo2", "key-soak-charlie"}
	owner := map[string]string{} // node name → key
	var nodes []*fakeNode
	for _, key := range keys {
		var ws []map[string]any
		for j := range 3 {
			name := fmt.Sprintf("%s-n%d", key[9:], j)
			n := soakNode(t, name)
			nodes = append(nodes, n)
			owner[name] = key
			ws = append(ws, wl("w"+name, n.host, int64(j), "t"))
		}
		api.set(key, ws...)
	}
	h := startProxy(t, api, withConfig(func(c *config) {
		c.logLevel = 100 // quiet: the log would hold every request
		c.refreshInterval = 200 * time.Millisecond
	}))
	// Requests that hang up early get a client of their own: in one shared
	// pool, net/http can hand a dial cancelled for one request to another,
	// which then fails with "context canceled" it never asked for.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	leaver := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	for _, key := range keys { // warm: every key cached, then the baseline
		h.get(t, "/workloads", key, 200)
	}
	client.CloseIdleConnections()
	h.p.nodes.(*http.Transport).CloseIdleConnections()
	baseline := runtime.NumGoroutine()

	var outcomes sync.Map // outcome → *atomic.Int64
	count := func(o string) {
		v, _ := outcomes.LoadOrStore(o, new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	}
	var wrong atomic.Int64
	bad := func(format string, args ...any) {
		if wrong.Add(1) <= 10 {
			t.Errorf(format, args...)
		}
	}
	bodies := [][]byte{nil, []byte("x"), bytes.Repeat([]byte("b"), 10<<10), bytes.Repeat([]byte("c"), 100<<10)}
	work := make(chan int)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for i := range work {
				key := keys[i%len(keys)]
				var path, method = "", http.MethodGet
				var body []byte
				switch kind := rand.IntN(10); {
				case kind < 3:
					path = "/tags/t/x"
				case kind < 5:
					method, path, body = http.MethodPost, "/tags/all/echo", bodies[rand.IntN(len(bodies))]
				case kind < 7:
					path = fmt.Sprintf("/%d/x", rand.IntN(4)) // /3 is out of range
				case kind < 8:
					path = "/tags/t/stream"
				case kind < 9:
					path = "/workloads"
				default:
					path = "/tags/nosuch/x"
				}
				ctx, cancel := context.WithCancel(context.Background())
				cancelEarly := rand.IntN(10) == 0
				if cancelEarly {
					time.AfterFunc(time.Duration(rand.IntN(2000))*time.Microsecond, cancel)
				}
				req, _ := http.NewRequestWithContext(ctx, method, h.url+path, bytes.NewReader(body))
				req.Header.Set("X-C3-API-KEY", key)
				c := client
				if cancelEarly {
					c = leaver
				}
				res, err := c.Do(req)
				if err != nil {
					cancel()
					if cancelEarly {
						count("client cancelled")
					} else {
						bad("%s %s: %v", method, path, err)
					}
					continue
				}
				got, readErr := io.ReadAll(res.Body)
				res.Body.Close()
				cancel()
				node := res.Header.Get("X-Node")
				switch {
				case readErr != nil && cancelEarly:
					count("client cancelled")
				case node != "" && owner[node] != key:
					bad("%s %s: answered by %s, a node of another key", method, path, node)
				case readErr != nil && path == "/tags/t/stream" && res.StatusCode == 200:
					count("stream broken by its node")
				case readErr != nil:
					bad("%s %s: %d, reading: %v", method, path, res.StatusCode, readErr)
				case res.StatusCode == 502 && path != "/workloads" && path != "/tags/nosuch/x":
					count("502 node failed")
				case res.StatusCode == 404 && (path == "/3/x" || path == "/tags/nosuch/x"):
					count("404")
				case res.StatusCode != 200:
					bad("%s %s: unexpected %d %s", method, path, res.StatusCode, got)
				case path == "/workloads":
					if !strings.Contains(string(got), "w"+key[9:]) {
						bad("/workloads of %s lists %s", key, got)
					}
					count("200")
				case node == "":
					bad("%s %s: 200 without a node", method, path)
				case method == http.MethodPost && !bytes.Equal(got, body):
					bad("%s %s: %d bytes echoed for %d sent", method, path, len(got), len(body))
				case path == "/tags/t/stream" && !strings.HasSuffix(string(got), " 4\n\n"):
					bad("stream ended early without an error: %q", got)
				default:
					count("200")
				}
			}
		})
	}
	start := time.Now()
	for i := range total {
		work <- i
	}
	close(work)
	wg.Wait()
	elapsed := time.Since(start)

	client.CloseIdleConnections()
	leaver.CloseIdleConnections()
	h.client.CloseIdleConnections()
	h.waitIdle(t, nodes...)
	h.p.nodes.(*http.Transport).CloseIdleConnections()
	waitFor(t, 10*time.Second, func() bool { return runtime.NumGoroutine() <= baseline+5 })

	var summary []string
	outcomes.Range(func(k, v any) bool {
		summary = append(summary, fmt.Sprintf("%s=%d", k, v.(*atomic.Int64).Load()))
		return true
	})
	slices.Sort(summary)
	t.Logf("%d requests in %v: %s; goroutines %d (baseline %d)", total, elapsed.Round(time.Millisecond),
		strings.Join(summary, " "), runtime.NumGoroutine(), baseline)
}

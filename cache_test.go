package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestFirstFetchIsShared(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-coalesce-01"
	gate := make(chan struct{})
	body, _ := json.Marshal([]any{wl("w1", node.host, 1, "t")})
	api.answer(key, apiAnswer{status: 200, body: string(body), delay: gate})
	h := startProxy(t, api)

	const n = 20
	var wg sync.WaitGroup
	statuses := make(chan int, n)
	for i := range n {
		path := []string{"/tags/t/x", "/0/x", "/workloads", "/tags/all"}[i%4]
		wg.Go(func() {
			res, _ := h.do(t, http.MethodGet, path, key, nil)
			statuses <- res.StatusCode
		})
	}
	// Every request is waiting on the one fetch the API is holding.
	waitFor(t, 5*time.Second, func() bool {
		h.p.cache.mu.RLock()
		e := h.p.cache.entries[key]
		h.p.cache.mu.RUnlock()
		return e != nil && e.active.Load() == n
	})
	close(gate)
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != 200 {
			t.Errorf("status %d, want 200", s)
		}
	}
	if got := api.postsFor(key); got != 1 {
		t.Fatalf("%d concurrent first requests caused %d API calls, want 1", n, got)
	}
}

func TestWaiterThatLeavesFailsNoOne(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-leaver-0001"
	gate := make(chan struct{})
	body, _ := json.Marshal([]any{wl("w1", node.host, 1)})
	api.answer(key, apiAnswer{status: 200, body: string(body), delay: gate})
	h := startProxy(t, api)

	// The first waiter gives up; the fetch it started must still serve the second.
	first, _ := http.NewRequest(http.MethodGet, h.url+"/0/x", nil)
	first.Header.Set("X-C3-API-KEY", key)
	client := &http.Client{Timeout: 100 * time.Millisecond}
	if res, err := client.Do(first); err == nil {
		res.Body.Close()
		t.Fatalf("the first request should have timed out, got %d", res.StatusCode)
	}
	done := make(chan string, 1)
	go func() { done <- h.get(t, "/0/x", key, 200) }()
	waitFor(t, 5*time.Second, func() bool { return api.postsFor(key) == 1 })
	close(gate)
	if got := <-done; got != "n" {
		t.Fatalf("got %q", got)
	}
	if got := api.postsFor(key); got != 1 {
		t.Errorf("API calls: got %d, want 1", got)
	}
}

func TestRefreshEveryInterval(t *testing.T) {
	api := newFakeAPI(t)
	a, b := newNode(t, "a", false, nil), newNode(t, "b", false, nil)
	const key = "key-refresh-001"
	api.set(key, wl("wa", a.host, 1, "t"))
	h := startProxy(t, api, withConfig(func(c *config) { c.refreshInterval = 40 * time.Millisecond }))

	h.get(t, "/tags/t/x", key, 200)
	waitFor(t, 5*time.Second, func() bool { return api.postsFor(key) >= 4 })

	// A node launched later shows up without any request having missed.
	api.set(key, wl("wa", a.host, 1, "t"), wl("wb", b.host, 2, "t"))
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(h.get(t, "/workloads", key, 200), "wb") })
	if !strings.Contains(h.logs.String(), "node added") {
		t.Errorf("no INFO line for the added node")
	}
	// And one that stops is no longer routed to.
	stopped := wl("wa", a.host, 1, "t")
	stopped["status"] = "stopping"
	api.set(key, stopped, wl("wb", b.host, 2, "t"))
	waitFor(t, 5*time.Second, func() bool { return h.get(t, "/0/x", key, 200) == "b" })
	for range 5 {
		if got := h.get(t, "/tags/t/x", key, 200); got != "b" {
			t.Fatalf("routed to %q after its workload stopped", got)
		}
	}
	logs := h.logs.String()
	if !strings.Contains(logs, "node removed") || !strings.Contains(logs, "from=running to=stopping") {
		t.Errorf("status change and removed node not logged")
	}
}

func TestSlowKeyHoldsUpNoOther(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const slow, fast = "key-slow-000001", "key-fast-000001"
	api.set(slow, wl("w1", node.host, 1))
	api.set(fast, wl("w2", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) { c.refreshInterval = 30 * time.Millisecond }))
	h.get(t, "/0/x", slow, 200)
	h.get(t, "/0/x", fast, 200)

	gate := make(chan struct{})
	defer close(gate)
	body, _ := json.Marshal([]any{wl("w1", node.host, 1)})
	api.answer(slow, apiAnswer{status: 200, body: string(body), delay: gate})
	waitFor(t, 5*time.Second, func() bool { return api.postsFor(slow) >= 2 }) // its refresh now hangs
	hung, before := api.postsFor(slow), api.postsFor(fast)
	waitFor(t, 5*time.Second, func() bool { return api.postsFor(fast) >= before+5 })
	if got := api.postsFor(slow); got != hung {
		t.Errorf("a key whose fetch hangs was fetched again: %d calls, want %d", got, hung)
	}
	// The hanging key is still served from its list.
	h.get(t, "/0/x", slow, 200)
}

func TestIdleKeysAreEvicted(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-idle-000001"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.refreshInterval = 20 * time.Millisecond
		c.idleTimeout = 150 * time.Millisecond
	}))

	h.get(t, "/0/x", key, 200)
	waitFor(t, 5*time.Second, func() bool { return h.cachedKeys() == 0 })
	if !strings.Contains(h.logs.String(), "key evicted") {
		t.Errorf("eviction not logged")
	}
	// Evicted keys are no longer refreshed: 10 ticks, no call.
	calls := api.postsFor(key)
	deadline := time.Now().Add(10 * 20 * time.Millisecond)
	for time.Now().Before(deadline) {
		if got := api.postsFor(key); got != calls {
			t.Fatalf("an evicted key was fetched again (%d calls, was %d)", got, calls)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The balancer forgets the node no key uses any more.
	waitFor(t, 5*time.Second, func() bool { return len(*h.p.bal.loads.Load()) == 0 })
	// The next request fetches afresh.
	h.get(t, "/0/x", key, 200)
	if got := api.postsFor(key); got != calls+1 {
		t.Errorf("API calls after the key came back: got %d, want %d", got, calls+1)
	}
}

func TestKeyWithStreamInFlightIsNotEvicted(t *testing.T) {
	api := newFakeAPI(t)
	release := make(chan struct{})
	node := streamingNode(t, "text/event-stream", []string{"data: 1\n\n"}, []string{"data: 2\n\n"}, release)
	const key = "key-longstream1"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.refreshInterval = 20 * time.Millisecond
		c.idleTimeout = 60 * time.Millisecond
	}))

	req, _ := http.NewRequest(http.MethodGet, h.url+"/0/stream", nil)
	req.Header.Set("X-C3-API-KEY", key)
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	// Refreshes go on long past the idle timeout: the key is still cached.
	start := time.Now()
	calls := api.postsFor(key)
	waitFor(t, 5*time.Second, func() bool {
		return time.Since(start) > 5*60*time.Millisecond && api.postsFor(key) >= calls+5
	})
	if h.cachedKeys() != 1 {
		t.Fatalf("a key with a stream in flight was evicted")
	}
	close(release)
	io.ReadAll(res.Body)
	waitFor(t, 5*time.Second, func() bool { return h.cachedKeys() == 0 })
}

func TestMissTriggersOneRefetch(t *testing.T) {
	api := newFakeAPI(t)
	a, b := newNode(t, "a", false, nil), newNode(t, "b", false, nil)
	const key = "key-miss-000001"
	const bound = 300 * time.Millisecond
	api.set(key, wl("wa", a.host, 1, "old"))
	h := startProxy(t, api, func(_ *config, p *proxy) {
		if p != nil {
			p.cache.missRefetchAfter = bound
		}
	})
	h.get(t, "/tags/old/x", key, 200)
	api.set(key, wl("wa", a.host, 1, "old"), wl("wb", b.host, 2, "new"))

	// The list is fresh: a miss answers 404 without asking the API.
	h.get(t, "/tags/new/x", key, 404)
	h.get(t, "/1/x", key, 404)
	if got := api.postsFor(key); got != 1 {
		t.Fatalf("a miss on a fresh list called the API (%d calls)", got)
	}

	// Once the list is older than the bound, a flood of misses causes one
	// shared fetch, and the new node answers.
	start := time.Now()
	waitFor(t, 5*time.Second, func() bool { return time.Since(start) > bound })
	var wg sync.WaitGroup
	answers := make(chan string, 30)
	for i := range 30 {
		path := []string{"/tags/new/x", "/1/x", "/tags/nosuch/x"}[i%3]
		wg.Go(func() {
			res, body := h.do(t, http.MethodGet, path, key, nil)
			answers <- fmt.Sprint(path, " ", res.StatusCode, " ", body)
		})
	}
	wg.Wait()
	close(answers)
	for a := range answers {
		if !strings.HasSuffix(a, " 200 b") && !strings.HasPrefix(a, "/tags/nosuch/x 404") {
			t.Errorf("after the re-fetch: %s", a)
		}
	}
	if got := api.postsFor(key); got != 2 {
		t.Fatalf("30 misses caused %d API calls in all, want 2", got)
	}

	// A failing API: at most one attempt per bound, however many misses.
	api.answer(key, apiAnswer{status: 500, body: "down"})
	start = time.Now()
	for time.Since(start) < 3*bound {
		h.get(t, "/tags/nosuch/x", key, 404)
		h.get(t, "/tags/new/x", key, 200) // served from the last good list meanwhile
	}
	elapsed := time.Since(start)
	if extra, limit := api.postsFor(key)-2, int(elapsed/bound)+1; extra > limit {
		t.Fatalf("%v of misses with a failing API caused %d calls, want at most %d", elapsed, extra, limit)
	}
}

func TestStaleListServedWhileAPIFails(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-stale-00001"
	api.set(key, wl("w1", node.host, 1, "t"))
	h := startProxy(t, api, withConfig(func(c *config) { c.refreshInterval = 20 * time.Millisecond }))
	h.get(t, "/tags/t/x", key, 200)

	for _, failure := range []apiAnswer{
		{status: 503, body: "maintenance"},
		{status: 200, body: "<html>not json"},
		{status: 200, body: `[{"workload":"w1"`},
	} {
		api.answer(key, failure)
		calls := api.postsFor(key)
		waitFor(t, 5*time.Second, func() bool { return api.postsFor(key) >= calls+2 })
		if got := h.get(t, "/tags/t/x", key, 200); got != "n" {
			t.Fatalf("%s: got %q from the stale list", failure.body, got)
		}
		if body := h.get(t, "/workloads", key, 200); !strings.Contains(body, `"w1"`) {
			t.Fatalf("%s: /workloads lost the last good list: %s", failure.body, body)
		}
	}
	if !strings.Contains(h.logs.String(), "level=WARN msg=\"workloads refresh failed") {
		t.Errorf("failed refreshes not logged at WARN")
	}
}

func TestRefreshRejectedDropsKey(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-revoked-001"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) { c.refreshInterval = 20 * time.Millisecond }))
	h.get(t, "/0/x", key, 200)

	api.answer(key, apiAnswer{status: 403, body: `{"error":"revoked"}`})
	waitFor(t, 5*time.Second, func() bool { return h.cachedKeys() == 0 })
	res, body := h.do(t, http.MethodGet, "/0/x", key, nil)
	if res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("after the API revoked the key: got %d %s, want 401", res.StatusCode, body)
	}
	errorBody(t, res, body)
}

func TestDecodeWorkloads(t *testing.T) {
	tests := []struct {
		name, body string
		ok         bool
		n          int
	}{
		{"empty array", `[]`, true, 0},
		{"spaces", " \n[ ] ", true, 0},
		{"full", `[{"workload":"w","node":"n","type":"x","status":"running","running":true,"created":1,"expires":2,"tags":["a"],"new":{}}]`, true, 1},
		{"null tags and missing fields", `[{"workload":"w","tags":null},{}]`, true, 2},
		{"float created", `[{"workload":"w","created":1732600000.5}]`, true, 1},
		{"null element", `[null]`, true, 1},
		{"null", `null`, false, 0},
		{"object", `{"workloads":[]}`, false, 0},
		{"empty", ``, false, 0},
		{"truncated", `[{"workload":"w"`, false, 0},
		{"string created", `[{"created":"yesterday"}]`, false, 0},
		{"number element", `[1]`, false, 0},
		{"tags not a list", `[{"tags":"a"}]`, false, 0},
		{"trailing garbage", `[] x`, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			raws, parsed, err := decodeWorkloads([]byte(tc.body))
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if len(raws) != tc.n || len(parsed) != tc.n {
				t.Fatalf("got %d raw, %d parsed, want %d", len(raws), len(parsed), tc.n)
			}
		})
	}
}

func TestIndexOrderIsStable(t *testing.T) {
	ws := []any{
		wl("w-c", "c:1", 300), wl("w-b2", "b2:1", 200), wl("w-a", "a:1", 100),
		wl("w-b1", "b1:1", 200), wl("w-d", "d:1", 400),
	}
	want := "a:1 b1:1 b2:1 c:1 d:1" // created ascending, then workload id
	for range 20 {
		rand.Shuffle(len(ws), func(i, j int) { ws[i], ws[j] = ws[j], ws[i] })
		body, _ := json.Marshal(ws)
		raws, parsed, err := decodeWorkloads(body)
		if err != nil {
			t.Fatal(err)
		}
		s, bad := newSnapshot(raws, parsed, "https", time.Now())
		if len(bad) != 0 {
			t.Fatalf("unexpected unusable nodes: %v", bad)
		}
		if got := strings.Join(s.indexed.hosts, " "); got != want {
			t.Fatalf("index order %s, want %s", got, want)
		}
	}
}

func TestNodeURL(t *testing.T) {
	tests := []struct {
		node, scheme, want string // want "" means unusable
	}{
		{"gpu1.comput3.ai", "https", "https://gpu1.comput3.ai"},
		{"10.0.0.5:11434", "http", "http://10.0.0.5:11434"},
		{"[::1]:8080", "http", "http://[::1]:8080"},
		{"http://gpu1:8000", "https", "http://gpu1:8000"},
		{"https://gpu1/ollama", "http", "https://gpu1/ollama"},
		{"gpu1/path", "https", ""},
		{"user@gpu1", "https", ""},
		{"gpu1?x", "https", ""},
		{"ftp://gpu1", "https", ""},
		{"https://", "https", ""},
		{"https://u:p@gpu1", "https", ""},
		{"https://gpu1/?q=1", "https", ""},
		{"gpu 1", "https", ""},
	}
	for _, tc := range tests {
		u, err := nodeURL(tc.node, tc.scheme)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("nodeURL(%q) = %s, want an error", tc.node, u)
		case tc.want != "" && (err != nil || u.String() != tc.want):
			t.Errorf("nodeURL(%q, %s) = %v, %v, want %s", tc.node, tc.scheme, u, err, tc.want)
		}
	}
}

func TestFingerprint(t *testing.T) {
	for _, key := range []string{"", "k", "a-much-longer-key-than-eight-bytes", strings.Repeat("x", 10000)} {
		fp := fingerprint(key)
		if len(fp) != 8 || (len(key) >= 8 && strings.Contains(key, fp)) {
			t.Errorf("fingerprint(%d-byte key) = %q", len(key), fp)
		}
	}
	if fingerprint("a") == fingerprint("b") {
		t.Errorf("different keys share a fingerprint")
	}
}

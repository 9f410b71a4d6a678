package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape reads /metrics into series → value, checking the content type.
func (h *harness) scrape(t *testing.T) (map[string]float64, string) {
	t.Helper()
	res, body := h.do(t, http.MethodGet, "/metrics", "", nil)
	if res.StatusCode != 200 {
		t.Fatalf("/metrics: %d", res.StatusCode)
	}
	if ct := res.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4" {
		t.Fatalf("/metrics content type %q", ct)
	}
	series := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q", line)
		}
		series[line[:i]] = v
	}
	return series, body
}

func TestMetricsCountExactly(t *testing.T) {
	api := newFakeAPI(t)
	a, b := newNode(t, "a", false, nil), newNode(t, "b", false, nil)
	dead := refusedNode(t)
	const key, key2 = "key-metrics-001", "key-metrics-002"
	api.set(key, wl("wa", a.host, 1, "t"), wl("wb", b.host, 2, "t"))
	api.set(key2, wl("wd", "http://"+dead, 1))
	h := startProxy(t, api)

	for range 4 {
		h.get(t, "/tags/t/x", key, 200)
	}
	h.get(t, "/0/x", key, 200)
	h.get(t, "/1/x", key, 200)
	h.get(t, "/5/x", key, 404)
	h.get(t, "/workloads", key, 200)
	h.get(t, "/foo/bar", key, 404)
	h.get(t, "/0/x", "", 401)
	h.get(t, "/healthz", "", 200)
	h.get(t, "/0/x", key2, 502)
	h.get(t, "/0/x", "key-metrics-bad", 401)

	got, text := h.scrape(t)
	want := map[string]float64{
		`c3proxy_requests_total{route="tags",code="200"}`:                     4,
		`c3proxy_requests_total{route="index",code="200"}`:                    2,
		`c3proxy_requests_total{route="index",code="404"}`:                    1,
		`c3proxy_requests_total{route="index",code="502"}`:                    1,
		`c3proxy_requests_total{route="index",code="401"}`:                    1,
		`c3proxy_requests_total{route="workloads",code="200"}`:                1,
		`c3proxy_requests_total{route="other",code="404"}`:                    1,
		`c3proxy_requests_total{route="other",code="401"}`:                    1,
		`c3proxy_requests_total{route="other",code="200"}`:                    1,
		`c3proxy_request_duration_seconds_count{route="tags"}`:                4,
		`c3proxy_stream_duration_seconds_count{route="index"}`:                5,
		`c3proxy_request_duration_seconds_bucket{route="tags",le="+Inf"}`:     4,
		`c3proxy_node_requests_total{node="` + a.host + `",code="200"}`:       3,
		`c3proxy_node_requests_total{node="` + b.host + `",code="200"}`:       3,
		`c3proxy_node_in_flight{node="` + a.host + `"}`:                       0,
		`c3proxy_node_in_flight{node="` + b.host + `"}`:                       0,
		`c3proxy_node_in_flight{node="` + dead + `"}`:                         0,
		`c3proxy_node_failures_total{node="` + dead + `",reason="connect"}`:   1,
		`c3proxy_node_failures_total{node="` + a.host + `",reason="connect"}`: 0,
		`c3proxy_api_fetches_total{result="ok"}`:                              2,
		`c3proxy_api_fetches_total{result="rejected"}`:                        1,
		`c3proxy_api_fetches_total{result="error"}`:                           0,
		`c3proxy_api_fetch_duration_seconds_count`:                            3,
		`c3proxy_cached_keys`:                                                 2,
		`c3proxy_routable_nodes`:                                              3,
	}
	for series, v := range want {
		if got[series] != v {
			t.Errorf("%s: got %v, want %v", series, got[series], v)
		}
	}
	if _, ok := got[`c3proxy_requests_total{route="tags",code="404"}`]; ok {
		t.Errorf("a series for a count that never happened")
	}
	if got["go_goroutines"] < 1 || got["process_resident_memory_bytes"] < 1<<20 {
		t.Errorf("runtime gauges: goroutines %v, rss %v", got["go_goroutines"], got["process_resident_memory_bytes"])
	}
	for _, k := range []string{key, key2, "key-metrics-bad"} {
		if strings.Contains(text, k) || strings.Contains(text, fingerprint(k)) {
			t.Errorf("the metrics carry a key or its fingerprint")
		}
	}
}

func TestMetricsInFlightGauge(t *testing.T) {
	api := newFakeAPI(t)
	release := make(chan struct{})
	node := streamingNode(t, "text/event-stream", []string{"data: 1\n\n"}, []string{"data: 2\n\n"}, release)
	const key = "key-gauge-00001"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api)
	gauge := `c3proxy_node_in_flight{node="` + node.host + `"}`

	req, _ := http.NewRequest(http.MethodGet, h.url+"/0/s", nil)
	req.Header.Set("X-C3-API-KEY", key)
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if line, _ := bufio.NewReader(res.Body).ReadString('\n'); line != "data: 1\n" {
		t.Fatalf("first event %q", line)
	}
	if got, _ := h.scrape(t); got[gauge] != 1 {
		t.Fatalf("during the stream: %s = %v, want 1", gauge, got[gauge])
	}
	close(release)
	io.ReadAll(res.Body)
	res.Body.Close()
	waitFor(t, 5*time.Second, func() bool { got, _ := h.scrape(t); return got[gauge] == 0 })
	got, _ := h.scrape(t)
	if got[`c3proxy_stream_duration_seconds_count{route="index"}`] != 1 {
		t.Errorf("the stream was not counted once it ended")
	}
}

func TestMetricsForgetUnusedNodes(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-forget-0001"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.refreshInterval = 20 * time.Millisecond
		c.idleTimeout = 100 * time.Millisecond
	}))
	h.get(t, "/0/x", key, 200)
	if _, text := h.scrape(t); !strings.Contains(text, node.host) {
		t.Fatalf("no series for the node in use")
	}
	waitFor(t, 5*time.Second, func() bool { _, text := h.scrape(t); return !strings.Contains(text, node.host) })
	got, _ := h.scrape(t)
	if got["c3proxy_cached_keys"] != 0 || got["c3proxy_routable_nodes"] != 0 {
		t.Errorf("after eviction: cached_keys %v, routable_nodes %v", got["c3proxy_cached_keys"], got["c3proxy_routable_nodes"])
	}
}

// promtool returns the path of promtool, installing Debian's prometheus
// package when it is missing and the test runs as root.
func promtool(t *testing.T) string {
	t.Helper()
	if path, err := exec.LookPath("promtool"); err == nil {
		return path
	}
	if os.Getuid() == 0 {
		install := exec.Command("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus")
		if out, err := install.CombinedOutput(); err != nil {
			t.Logf("installing prometheus: %v\n%s", err, out)
		}
	}
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool is not installed and Debian's prometheus package could not be installed")
	}
	return path
}

func TestMetricsPassPromtool(t *testing.T) {
	tool := promtool(t)
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-promtool-01"
	api.set(key, wl("w1", node.host, 1, "t"))
	h := startProxy(t, api)
	h.get(t, "/tags/t/x", key, 200)
	h.get(t, "/0/x", "", 401)
	_, text := h.scrape(t)
	cmd := exec.Command(tool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s\n--- metrics:\n%s", err, out, text)
	}
}

func TestAccessLog(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-accesslog-1"
	api.set(key, wl("w1", node.host, 1, "gpu"))
	h := startProxy(t, api, withConfig(func(c *config) {
		c.logJSON, c.accessLog, c.logLevel = true, true, 0 // INFO
	}))

	req, _ := http.NewRequest(http.MethodPost, h.url+"/tags/gpu/api/generate?q=1", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+key)
	res, body := h.send(t, req)
	if res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	h.get(t, "/3/x", key, 404)

	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(h.logs.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("a log line is not JSON: %q", l)
		}
		if m["msg"] == "request" {
			lines = append(lines, m)
		}
	}
	if len(lines) != 2 {
		t.Fatalf("%d access log lines, want 2", len(lines))
	}
	line := lines[0]
	checks := map[string]any{
		"level": "INFO", "method": "POST", "path": "/tags/gpu/api/generate", "route": "tags", "tag": "gpu",
		"node": node.host, "status": 200.0, "bytes_out": float64(len(body)), "key": fingerprint(key),
		"request_id": res.Header.Get("X-Request-Id"), "tried": 1.0,
	}
	for field, want := range checks {
		if line[field] != want {
			t.Errorf("%s: got %v, want %v", field, line[field], want)
		}
	}
	duration, _ := line["duration_ms"].(float64)
	ttfb, _ := line["ttfb_ms"].(float64)
	if duration <= 0 || ttfb <= 0 || ttfb > duration {
		t.Errorf("duration_ms %v, ttfb_ms %v", line["duration_ms"], line["ttfb_ms"])
	}
	if line["request_id"] == "" {
		t.Errorf("no request id")
	}
	if miss := lines[1]; miss["status"] != 404.0 || miss["route"] != "index" || miss["index"] != 3.0 {
		t.Errorf("the 404 line: %v", miss)
	}

	t.Run("off at INFO without ACCESS_LOG", func(t *testing.T) {
		h := startProxy(t, api, withConfig(func(c *config) { c.logJSON, c.logLevel = true, 0 }))
		h.get(t, "/0/x", key, 200)
		if strings.Contains(h.logs.String(), `"msg":"request"`) {
			t.Errorf("an access line without ACCESS_LOG")
		}
	})
}

func TestRequestID(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Request-Id", r.Header.Get("X-Request-Id"))
		w.Header().Set("X-Request-Id", "the-node-own-id") // must not reach the client twice
		io.WriteString(w, "ok")
	})
	const key = "key-requestid-1"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api)

	tests := []struct{ name, sent, want string }{
		{"passed through", "client-id-42", "client-id-42"},
		{"generated", "", ""},
		{"too long", strings.Repeat("x", 200), ""},
		{"with spaces", "a b", ""},
	}
	seen := map[string]bool{}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, h.url+"/0/x", nil)
			req.Header.Set("X-C3-API-KEY", key)
			if tc.sent != "" {
				req.Header.Set("X-Request-Id", tc.sent)
			}
			res, _ := h.send(t, req)
			ids := res.Header.Values("X-Request-Id")
			if len(ids) != 1 {
				t.Fatalf("response carries %d X-Request-Id values: %v", len(ids), ids)
			}
			if tc.want != "" && ids[0] != tc.want {
				t.Fatalf("got %q, want %q", ids[0], tc.want)
			}
			if tc.want == "" && (len(ids[0]) != 16 || seen[ids[0]] || ids[0] == tc.sent) {
				t.Fatalf("generated id %q is not a fresh 16-digit id", ids[0])
			}
			seen[ids[0]] = true
			if got := res.Header.Get("X-Seen-Request-Id"); got != ids[0] {
				t.Fatalf("the node got %q, the client %q", got, ids[0])
			}
		})
	}
	res, _ := h.do(t, http.MethodGet, "/9/x", key, nil)
	if res.Header.Get("X-Request-Id") == "" {
		t.Errorf("an error answer has no X-Request-Id")
	}
}

func TestXC3NodeHeader(t *testing.T) {
	api := newFakeAPI(t)
	a, b := newNode(t, "a", false, nil), newNode(t, "b", true, nil)
	const key = "key-xc3node-001"
	api.set(key, wl("wa", a.host, 1, "t"), wl("wb", "https://"+b.host, 2, "t"))
	h := startProxy(t, api)
	for range 4 {
		res, body := h.do(t, http.MethodGet, "/tags/t/x", key, nil)
		want := map[string]string{"a": a.host, "b": b.host}[body]
		if got := res.Header.Get("X-C3-Node"); got == "" || got != want {
			t.Fatalf("X-C3-Node %q for an answer of %s (%s)", got, body, want)
		}
	}
	for _, path := range []string{"/workloads", "/7/x"} {
		if res, _ := h.do(t, http.MethodGet, path, key, nil); res.Header.Get("X-C3-Node") != "" {
			t.Errorf("%s: X-C3-Node on an answer no node gave", path)
		}
	}

}

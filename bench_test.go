package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

func BenchmarkRoute(b *testing.B) {
	for _, path := range []string{"/tags/llm/v1/chat/completions", "/3/api/generate", "/tags/all"} {
		b.Run(path, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := parseRoute(path); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPickNode(b *testing.B) {
	for _, n := range []int{1, 3, 16} {
		b.Run(fmt.Sprint(n, " nodes"), func(b *testing.B) {
			bal := newBalancer()
			hosts := make([]string, n)
			for i := range hosts {
				hosts[i] = fmt.Sprintf("node%d.example:443", i)
			}
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				_, load := bal.pickLeastBusy(hosts, now, nil)
				bal.release(load)
			}
		})
	}
}

// benchCache is a cache holding keys, each with a three-node list.
func benchCache(b *testing.B, keys int) (*cache, []string) {
	b.Helper()
	cfg, _ := loadConfig(env(nil))
	c := newCache(cfg.apiURL, nil, cfg, newLogger(io.Discard, cfg))
	snap := fuzzSnapshot(b)
	names := make([]string, keys)
	for i := range names {
		names[i] = fmt.Sprintf("c3-key-%032d", i)
		e := &entry{key: names[i], fp: fingerprint(names[i])}
		e.snap.Store(snap)
		c.entries[names[i]] = e
	}
	return c, names
}

// BenchmarkCacheHit looks up cached keys from every P at once.
func BenchmarkCacheHit(b *testing.B) {
	c, keys := benchCache(b, 100000)
	now := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		i := 0
		for pb.Next() {
			e, _, err := c.get(ctx, keys[i%len(keys)], now)
			if err != nil {
				b.Fatal(err)
			}
			e.done()
			i += 7919
		}
	})
}

// BenchmarkHotPath is everything a proxied request does before it is
// forwarded: key check, route parsing, cache lookup and node choice.
func BenchmarkHotPath(b *testing.B) {
	c, keys := benchCache(b, 100000)
	p := &proxy{cache: c, bal: newBalancer()}
	now := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		var fw forward
		i := 0
		for pb.Next() {
			key := keys[i%len(keys)]
			i += 7919
			if !token(key, maxKeyLen) {
				b.Fatal("key")
			}
			rt, err := parseRoute("/tags/llm/v1/chat/completions")
			if err != nil {
				b.Fatal(err)
			}
			e, snap, err := c.get(ctx, key, now)
			if err != nil {
				b.Fatal(err)
			}
			fw = forward{route: rt}
			if err := p.choose(snap, rt, &fw, now); err != nil {
				b.Fatal(err)
			}
			p.finish(&fw)
			e.done()
		}
	})
}

// discardWriter is a ResponseWriter that keeps nothing, so that a benchmark
// measures the proxy rather than a recorder.
type discardWriter struct{ h http.Header }

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *discardWriter) WriteHeader(int)             {}
func (w *discardWriter) Flush()                      {}

// BenchmarkProxyRoundTrip sends requests through the real handler to an
// httptest node over a real socket (kept alive).
func BenchmarkProxyRoundTrip(b *testing.B) {
	small := strings.Repeat("s", 47)
	large := strings.Repeat("L", 64<<10)
	node := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/64k" {
			io.WriteString(w, large)
			return
		}
		io.WriteString(w, small)
	})
	for _, tc := range []struct{ name, path string }{{"small", "/tags/all/small"}, {"64KiB", "/tags/all/64k"}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := newNode(b, "bench", false, node).host
			api := newFakeAPI(b)
			cfg, _ := loadConfig(env(map[string]string{"API_URL": api.url, "NODE_SCHEME": "http", "LOG_LEVEL": "error"}))
			const key = "bench-key-000001"
			api.set(key, wl("w1", srv, 1, "t"))
			nodes := newNodeTransport()
			nodes.TLSClientConfig = &tls.Config{RootCAs: testCertPool()}
			p := newProxy(newCache(cfg.apiURL, newAPIClient(cfg), cfg, newLogger(io.Discard, cfg)), newBalancer(), nodes, cfg, newLogger(io.Discard, cfg))
			req, _ := http.NewRequest(http.MethodGet, "http://proxy.example"+tc.path, nil)
			req.Header.Set("X-C3-API-KEY", key)
			req.RemoteAddr = "127.0.0.1:5555"
			w := &discardWriter{h: http.Header{}}
			p.ServeHTTP(w, req) // warm: key cached, connection open
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				clear(w.h)
				p.ServeHTTP(w, req)
			}
			b.StopTimer()
			nodes.CloseIdleConnections()
		})
	}
}

// TestServeForProfiling runs the real program, configured from the
// environment, for C3P_PROFILE_SECONDS, so that a load generator can drive
// it while the test binary records -test.cpuprofile or -test.memprofile.
// Skipped unless that variable is set; see README "Performance".
func TestServeForProfiling(t *testing.T) {
	secs, _ := strconv.Atoi(os.Getenv("C3P_PROFILE_SECONDS"))
	if secs <= 0 {
		t.Skip("set C3P_PROFILE_SECONDS to serve for profiling")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
	defer cancel()
	if err := run(ctx, os.Getenv, os.Stderr); err != nil {
		t.Fatal(err)
	}
}

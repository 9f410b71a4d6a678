package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

// fuzzSnapshot is one key's list: two routable nodes (one with a base
// path), one that is not.
func fuzzSnapshot(t testing.TB) *snapshot {
	body, _ := json.Marshal([]any{
		wl("w1", "own1.example:443", 1, "llm", "a/b"),
		wl("w2", "http://own2.example:8000/base", 2, "llm"),
		map[string]any{"workload": "w3", "node": "other.example", "status": "stopped", "running": false, "tags": []string{"llm"}},
	})
	raws, parsed, err := decodeWorkloads(body)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := newSnapshot(raws, parsed, "https", time.Now())
	return s
}

// FuzzRoute feeds arbitrary paths through route parsing, node choice and
// the outbound rewrite: whatever the path, the request goes to one of the
// key's own routable nodes, with an origin-form request target.
func FuzzRoute(f *testing.F) {
	for _, seed := range []string{
		"/tags/llm/v1/chat/completions", "/0", "/1/api/tags?x=1", "//evil.example/x",
		"/0/@evil.example", "/tags/all/http://evil.example/", "/0/..%2F..%2Fx", "/tags/a%2Fb/x",
		"/99999999999999999999", "/tags//x", "/0/%2F%2Fevil.example", "/workloads",
	} {
		f.Add(seed)
	}
	snap := fuzzSnapshot(f)
	own := []string{"own1.example:443", "own2.example:8000"}
	p := &proxy{bal: newBalancer()}
	f.Fuzz(func(t *testing.T, path string) {
		rt, err := parseRoute(path)
		if err != nil || rt.kind == routeWorkloads {
			return
		}
		if !strings.HasPrefix(rt.rest, "/") {
			t.Fatalf("rest %q of %q does not start with /", rt.rest, path)
		}
		fw := &forward{route: rt}
		if err := p.choose(snap, rt, fw, time.Now()); err != nil {
			return
		}
		defer p.finish(fw)
		in, err := http.NewRequestWithContext(context.WithValue(context.Background(), forwardKey{}, fw), http.MethodGet, "http://proxy.example/", nil)
		if err != nil {
			t.Fatal(err)
		}
		in.URL.RawQuery = "q=1"
		pr := &httputil.ProxyRequest{In: in, Out: in.Clone(in.Context())}
		rewrite(pr)
		out := pr.Out
		if !slices.Contains(own, out.URL.Host) || out.Host != "" {
			t.Fatalf("%q goes to host %q (Host header %q)", path, out.URL.Host, out.Host)
		}
		target := out.URL.RequestURI()
		parsed, err := url.ParseRequestURI(target)
		if err != nil || parsed.Host != "" || parsed.Scheme != "" || !strings.HasPrefix(target, "/") {
			t.Fatalf("%q gives request target %q (host %q, %v)", path, target, parsed.Host, err)
		}
	})
}

// FuzzDecodeWorkloads feeds arbitrary answers to the decoder and the
// snapshot builder: no panic, and only routable workloads' nodes are routed to.
func FuzzDecodeWorkloads(f *testing.F) {
	for _, seed := range []string{
		`[]`, `null`, `{}`, `[null]`, `[1]`,
		`[{"workload":"w","node":"n:1","status":"running","running":true,"created":1,"tags":["a"]}]`,
		`[{"workload":"w","node":"https://n/p","status":"running","running":true,"tags":null}]`,
		`[{"workload":"w","node":"n/../x","status":"running","running":true}]`,
		`[{"workload":"w","node":"","status":"running","running":true,"created":1e308}]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		raws, parsed, err := decodeWorkloads(body)
		if err != nil {
			return
		}
		s, _ := newSnapshot(raws, parsed, "https", time.Now())
		if len(s.workloads) != len(raws) || len(s.parsed) != len(raws) {
			t.Fatalf("%d workloads in, %d listed", len(raws), len(s.workloads))
		}
		allowed := map[string]bool{}
		for _, w := range parsed {
			if w.routable() {
				if u, err := nodeURL(w.Node, "https"); err == nil {
					allowed[u.Host] = true
				}
			}
		}
		check := func(set *nodeSet) {
			for i, h := range set.hosts {
				if !allowed[h] || set.bases[i].Host != h {
					t.Fatalf("routes to %q, not a routable node", h)
				}
			}
		}
		check(&s.indexed)
		check(&s.all)
		for _, set := range s.tagged {
			check(set)
		}
		for i := 1; i < len(s.indexed.hosts); i++ {
			if s.parsed[i-1].Created > s.parsed[i].Created {
				t.Fatalf("index order not by created")
			}
		}
	})
}

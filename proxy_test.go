package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestHealth(t *testing.T) {
	h := startProxy(t, newFakeAPI(t))
	for _, path := range []string{"/", "/healthz"} {
		res, body := h.do(t, http.MethodGet, path, "", nil)
		if res.StatusCode != http.StatusOK || !jsonEqual([]byte(body), `{"status":"ok"}`) {
			t.Errorf("GET %s: got %d %s, want 200 {\"status\":\"ok\"}", path, res.StatusCode, body)
		}
		res, body = h.do(t, http.MethodPost, path, "", nil)
		if res.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST %s: got %d, want 405", path, res.StatusCode)
		}
		errorBody(t, res, body)
	}
}

func TestKeyHeaders(t *testing.T) {
	api := newFakeAPI(t)
	alpha, beta := newNode(t, "alpha", false, nil), newNode(t, "beta", false, nil)
	api.set("key-alpha-0001", wl("wa", alpha.host, 1))
	api.set("key-beta-00002", wl("wb", beta.host, 1))
	h := startProxy(t, api)

	tests := []struct {
		name   string
		header http.Header
		want   string // node name, or "" for 401
	}{
		{"x-c3-api-key", http.Header{"X-C3-Api-Key": {"key-alpha-0001"}}, "alpha"},
		{"bearer", http.Header{"Authorization": {"Bearer key-beta-00002"}}, "beta"},
		{"bearer lower case", http.Header{"Authorization": {"bearer key-alpha-0001"}}, "alpha"},
		{"bearer upper case", http.Header{"Authorization": {"BEARER key-beta-00002"}}, "beta"},
		{"x-c3-api-key wins", http.Header{"X-C3-Api-Key": {"key-alpha-0001"}, "Authorization": {"Bearer key-beta-00002"}}, "alpha"},
		{"empty x-c3 falls back to bearer", http.Header{"X-C3-Api-Key": {" "}, "Authorization": {"Bearer key-beta-00002"}}, "beta"},
		{"no key", http.Header{}, ""},
		{"basic auth is no key", http.Header{"Authorization": {"Basic a2V5LWFscGhh"}}, ""},
		{"empty bearer", http.Header{"Authorization": {"Bearer "}}, ""},
		{"key the API rejects", http.Header{"X-C3-Api-Key": {"key-unknown-003"}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, h.url+"/0/v1/models", nil)
			req.Header = tc.header
			res, body := h.send(t, req)
			if tc.want == "" {
				if res.StatusCode != http.StatusUnauthorized {
					t.Fatalf("got %d %s, want 401", res.StatusCode, body)
				}
				errorBody(t, res, body)
				return
			}
			if res.StatusCode != http.StatusOK || body != tc.want {
				t.Fatalf("got %d %q, want 200 from %s", res.StatusCode, body, tc.want)
			}
		})
	}
}

// routedKey is a key with three routable workloads, listed out of order,
// and three that are not routable.
func routedKey(t *testing.T, api *fakeAPI, key string) (old, mid, young *fakeNode) {
	t.Helper()
	old, mid, young = newNode(t, "old", false, nil), newNode(t, "mid", false, nil), newNode(t, "young", false, nil)
	stopped := wl("w-stopped", "10.9.9.9:1", 50, "gpu")
	stopped["status"] = "stopped"
	notRunning := wl("w-notrunning", "10.9.9.8:1", 60, "gpu")
	notRunning["running"] = false
	noNode := wl("w-nonode", "", 70, "gpu")
	withExtra := wl("w-mid", mid.host, 200, "gpu")
	withExtra["extra"] = map[string]any{"kept": true}
	youngW := wl("w-young", young.host, 300)
	delete(youngW, "tags")
	api.set(key, youngW, stopped, withExtra, notRunning, wl("w-old", old.host, 100, "gpu", "llm"), noNode)
	return old, mid, young
}

func TestRoutes(t *testing.T) {
	api := newFakeAPI(t)
	const key = "key-routes-0001"
	routedKey(t, api, key)
	h := startProxy(t, api)

	tests := []struct {
		path   string
		status int
		from   []string // nodes allowed to answer a 200
		msg    string   // part of the error message of a non-200
	}{
		{"/0/x", 200, []string{"old"}, ""},
		{"/0", 200, []string{"old"}, ""},
		{"/1/", 200, []string{"mid"}, ""},
		{"/2/api/tags", 200, []string{"young"}, ""},
		{"/00/x", 200, []string{"old"}, ""},
		{"/3/x", 404, nil, "index 3"},
		{"/99999999999999999999999/x", 404, nil, "no routable workload"},
		{"/tags/llm/x", 200, []string{"old"}, ""},
		{"/tags/llm", 200, []string{"old"}, ""},
		{"/tags/gpu/x", 200, []string{"old", "mid"}, ""},
		{"/tags/all/x", 200, []string{"old", "mid", "young"}, ""},
		{"/tags/nosuch/x", 404, nil, `"nosuch"`},
		{"/foo/bar", 404, nil, "/tags/{tag}"},
		{"/tags", 404, nil, "/{n}"},
		{"/tags/", 404, nil, "/{n}"},
		{"/tags//x", 404, nil, "/{n}"},
		{"/-1/x", 404, nil, "/tags/{tag}"},
		{"/1x/y", 404, nil, "/tags/{tag}"},
		{"/workloads/x", 404, nil, "/tags/{tag}"},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			t.Parallel()
			res, body := h.do(t, http.MethodGet, tc.path, key, nil)
			if res.StatusCode != tc.status {
				t.Fatalf("got %d %s, want %d", res.StatusCode, body, tc.status)
			}
			if tc.status != 200 {
				if msg := errorBody(t, res, body); !strings.Contains(msg, tc.msg) {
					t.Fatalf("error %q does not mention %q", msg, tc.msg)
				}
				return
			}
			if !contains(tc.from, body) {
				t.Fatalf("answered by %q, want one of %v", body, tc.from)
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func TestWorkloadsListing(t *testing.T) {
	api := newFakeAPI(t)
	const key = "key-listing-001"
	routedKey(t, api, key)
	h := startProxy(t, api)

	body := h.get(t, "/workloads", key, http.StatusOK)
	var got []map[string]any
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("listing %s: %v", body, err)
	}
	var ids []string
	for _, w := range got {
		ids = append(ids, fmt.Sprint(w["workload"]))
	}
	// Routable first, oldest first; then the others in the API's order.
	want := "w-old w-mid w-young w-stopped w-notrunning w-nonode"
	if strings.Join(ids, " ") != want {
		t.Fatalf("listing order: got %v, want %s", ids, want)
	}
	if extra, _ := got[1]["extra"].(map[string]any); extra["kept"] != true {
		t.Errorf("unknown fields are not passed through: %v", got[1])
	}
	// Element i is what /i routes to.
	for i := range 3 {
		node := fmt.Sprint(got[i]["node"])
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("%s/%d/", h.url, i), nil)
		req.Header.Set("X-C3-API-KEY", key)
		res, _ := h.send(t, req)
		// The fake node answers with its name; map it back to its host.
		if res.StatusCode != 200 {
			t.Fatalf("/%d: status %d", i, res.StatusCode)
		}
		if got := res.Header.Get("X-Node"); got != map[string]string{"w-old": "old", "w-mid": "mid", "w-young": "young"}[ids[i]] {
			t.Errorf("/%d answered by %s, listing says %s on %s", i, got, ids[i], node)
		}
	}
	res, body := h.do(t, http.MethodPost, "/workloads", key, nil)
	if res.StatusCode != http.StatusMethodNotAllowed || res.Header.Get("Allow") == "" {
		t.Errorf("POST /workloads: got %d, want 405 with Allow", res.StatusCode)
	}
	errorBody(t, res, body)
}

func TestForwardedRequest(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-forward-001"
	api.set(key, wl("w1", node.host, 1, "llm"))
	h := startProxy(t, api)
	proxyHost := strings.TrimPrefix(h.url, "http://")

	paths := []struct{ in, out string }{
		{"/0", "/"},
		{"/0/", "/"},
		{"/0/api/generate", "/api/generate"},
		{"/0/a%2Fb/c", "/a%2Fb/c"},
		{"/0/a%2fb", "/a%2fb"},
		{"/0/%41%20b+c", "/%41%20b+c"},
		{"/0/x?q=1&r=a%20b", "/x?q=1&r=a%20b"},
		{"/0/x?a=1;b=2&c=%zz", "/x?a=1;b=2&c=%zz"},
		{"/0?only=query", "/?only=query"},
		{"/tags/llm/v1/chat/completions?stream=true", "/v1/chat/completions?stream=true"},
		{"/tags/all//double//slash/", "//double//slash/"},
		{"/0/trailing/", "/trailing/"},
	}
	for _, p := range paths {
		t.Run("path "+p.in, func(t *testing.T) {
			h.get(t, p.in, key, http.StatusOK)
			if got := node.last(t).uri; got != p.out {
				t.Fatalf("node got %q, want %q", got, p.out)
			}
		})
	}

	t.Run("method body headers", func(t *testing.T) {
		for _, size := range []int{0, 1, 4 << 10, 1 << 20} {
			payload := strings.Repeat("x", size)
			req, _ := http.NewRequest(http.MethodPut, h.url+"/0/upload", strings.NewReader(payload))
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set("X-C3-API-KEY", key)
			req.Header.Set("X-Custom", "kept")
			req.Header.Set("Connection", "X-Hop")
			req.Header.Set("X-Hop", "dropped")
			req.Header.Set("X-Forwarded-For", "203.0.113.7")
			req.Header.Set("Forwarded", "for=evil")
			res, _ := h.send(t, req)
			if res.StatusCode != 200 {
				t.Fatalf("size %d: status %d", size, res.StatusCode)
			}
			got := node.last(t)
			checks := []struct{ what, got, want string }{
				{"method", got.method, http.MethodPut},
				{"body length", fmt.Sprint(len(got.body)), fmt.Sprint(size)},
				{"host", got.host, node.host},
				{"X-C3-API-KEY", got.header.Get("X-C3-API-KEY"), key},
				{"Authorization", got.header.Get("Authorization"), "Bearer " + key},
				{"X-Custom", got.header.Get("X-Custom"), "kept"},
				{"X-Hop", got.header.Get("X-Hop"), ""},
				{"Forwarded", got.header.Get("Forwarded"), ""},
				{"X-Forwarded-For", got.header.Get("X-Forwarded-For"), "203.0.113.7, 127.0.0.1"},
				{"X-Forwarded-Host", got.header.Get("X-Forwarded-Host"), proxyHost},
				{"X-Forwarded-Proto", got.header.Get("X-Forwarded-Proto"), "http"},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Errorf("size %d: %s: got %q, want %q", size, c.what, c.got, c.want)
				}
			}
			if string(got.body) != payload {
				t.Errorf("size %d: body changed on the way", size)
			}
		}
	})
}

func TestResponsePassesBack(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", "a=1")
		w.Header().Add("Set-Cookie", "b=2")
		w.Header().Set("X-Model", "llama")
		w.Header().Set("Content-Type", "application/vnd.test")
		w.Header().Set("Connection", "X-Secret-Hop")
		w.Header().Set("X-Secret-Hop", "no")
		w.Header().Set("Trailer", "X-Tokens")
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "short and stout")
		w.Header().Set("X-Tokens", "42")
	})
	const key = "key-response-01"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api)

	res, body := h.do(t, http.MethodGet, "/0/pot", key, nil)
	if res.StatusCode != http.StatusTeapot || body != "short and stout" {
		t.Fatalf("got %d %q, want 418 \"short and stout\"", res.StatusCode, body)
	}
	if got := res.Header.Values("Set-Cookie"); strings.Join(got, ";") != "a=1;b=2" {
		t.Errorf("Set-Cookie: got %v", got)
	}
	if res.Header.Get("X-Model") != "llama" || res.Header.Get("Content-Type") != "application/vnd.test" {
		t.Errorf("headers changed: %v", res.Header)
	}
	if res.Header.Get("X-Secret-Hop") != "" {
		t.Errorf("hop-by-hop header of the node passed: %v", res.Header)
	}
	if res.Trailer.Get("X-Tokens") != "42" {
		t.Errorf("trailer: got %v, want X-Tokens: 42", res.Trailer)
	}
}

// TestCompressionIsTheClients checks that the proxy neither asks a node for
// gzip on its own nor decompresses what the client asked compressed.
func TestCompressionIsTheClients(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Accept-Encoding", r.Header.Get("Accept-Encoding"))
		if r.Header.Get("Accept-Encoding") == "gzip" {
			w.Header().Set("Content-Encoding", "gzip")
			io.WriteString(w, "\x1f\x8bpretend-gzip")
			return
		}
		io.WriteString(w, "plain")
	})
	const key = "key-encoding-01"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api)
	// A raw client: net/http's would add Accept-Encoding itself.
	conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	for _, tc := range []struct{ sent, body string }{{"", "plain"}, {"gzip", "\x1f\x8bpretend-gzip"}} {
		req := "GET /0/x HTTP/1.1\r\nHost: p\r\nX-C3-API-KEY: " + key + "\r\n"
		if tc.sent != "" {
			req += "Accept-Encoding: " + tc.sent + "\r\n"
		}
		io.WriteString(conn, req+"\r\n")
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if got := res.Header.Get("X-Seen-Accept-Encoding"); got != tc.sent {
			t.Errorf("client sent Accept-Encoding %q, node got %q", tc.sent, got)
		}
		if string(body) != tc.body {
			t.Errorf("Accept-Encoding %q: body %q, want %q", tc.sent, body, tc.body)
		}
	}
}

func TestNodeForms(t *testing.T) {
	api := newFakeAPI(t)
	plain := newNode(t, "plain", false, nil)
	secure := newNode(t, "secure", true, nil)
	prefixed := newNode(t, "prefixed", false, nil)

	t.Run("NODE_SCHEME=https", func(t *testing.T) {
		const key = "key-scheme-0001"
		api.set(key, wl("w1", secure.host, 1))
		h := startProxy(t, api, withConfig(func(c *config) { c.nodeScheme = "https" }))
		if body := h.get(t, "/0/x", key, 200); body != "secure" {
			t.Fatalf("got %q from the TLS node", body)
		}
	})
	t.Run("base URLs", func(t *testing.T) {
		const key = "key-baseurl-001"
		api.set(key,
			wl("w1", "https://"+secure.host, 1),
			wl("w2", "http://"+plain.host, 2),
			wl("w3", "http://"+prefixed.host+"/ollama/", 3))
		h := startProxy(t, api, withConfig(func(c *config) { c.nodeScheme = "https" }))
		for i, want := range []string{"secure", "plain", "prefixed"} {
			if body := h.get(t, fmt.Sprintf("/%d/api/tags?x=1", i), key, 200); body != want {
				t.Fatalf("/%d: got %q, want %q", i, body, want)
			}
		}
		if got := prefixed.last(t).uri; got != "/ollama/api/tags?x=1" {
			t.Errorf("prefixed node got %q, want /ollama/api/tags?x=1", got)
		}
		if got := secure.last(t).host; got != secure.host {
			t.Errorf("TLS node got Host %q, want %q", got, secure.host)
		}
	})
}

// TestNoForeignHost sends paths shaped to make a proxy reach another host:
// every answer must come from the key's own node, and the other host must
// never be reached.
func TestNoForeignHost(t *testing.T) {
	api := newFakeAPI(t)
	own := newNode(t, "own", false, nil)
	other := newNode(t, "other", false, nil)
	api.set("key-own-000001", wl("w1", own.host, 1, "t"))
	api.set("key-other-00001", wl("w2", other.host, 1, "secret"))
	h := startProxy(t, api)
	o := other.host

	paths := []string{
		"//" + o + "/x", "/0//" + o + "/x", "/0/@" + o + "/x", "/0/..", "/0/../../x",
		"/0/%2F%2F" + o + "/x", "/0/..%2F..%2F" + o, "/tags/all/http://" + o + "/x",
		"/tags/t/@" + o, "/tags/t/%40" + o + "/x", "/0/http:%2F%2F" + o, "/0\\@" + o,
		"/tags/secret/x", "/1/x", "/tags/%2E%2E/x",
	}
	for _, p := range paths {
		for _, raw := range []bool{false, true} {
			status, node := rawGet(t, h, p, "key-own-000001", raw)
			if status == 200 && node != "own" {
				t.Errorf("GET %s (raw %v): answered by %q", p, raw, node)
			}
		}
	}
	// The request target in absolute form names another host.
	status, node := rawRequest(t, h, "GET http://"+o+"/0/x HTTP/1.1\r\nHost: "+o+"\r\nX-C3-API-KEY: key-own-000001\r\n\r\n")
	if status != 200 || node != "own" {
		t.Errorf("absolute-form request: got %d from %q, want 200 from own", status, node)
	}
	if hits := other.hits.Load(); hits != 0 {
		t.Fatalf("the other key's node was reached %d times", hits)
	}
}

// rawGet sends GET path with the key, through net/http's client or (raw) as
// bytes on a socket so that no client normalises the path.
func rawGet(t *testing.T, h *harness, path, key string, raw bool) (int, string) {
	t.Helper()
	if raw {
		return rawRequest(t, h, "GET "+path+" HTTP/1.1\r\nHost: proxy\r\nX-C3-API-KEY: "+key+"\r\n\r\n")
	}
	u, err := url.Parse(h.url)
	if err != nil {
		t.Fatal(err)
	}
	req := &http.Request{Method: http.MethodGet, URL: &url.URL{Scheme: "http", Host: u.Host, Opaque: path},
		Header: http.Header{"X-C3-Api-Key": {key}}, Host: u.Host}
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer res.Body.Close()
	io.Copy(io.Discard, res.Body)
	return res.StatusCode, res.Header.Get("X-Node")
}

func rawRequest(t *testing.T, h *harness, request string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%q: %v", request, err)
	}
	defer res.Body.Close()
	io.Copy(io.Discard, res.Body)
	return res.StatusCode, res.Header.Get("X-Node")
}

// streamingNode sends first, flushes, then waits for release before sending
// the rest: a client that reads first before releasing proves that nothing
// between them buffered it.
func streamingNode(t *testing.T, contentType string, first, rest []string, release <-chan struct{}) *fakeNode {
	return newNode(t, "streamer", false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		rc := http.NewResponseController(w)
		for _, chunk := range first {
			io.WriteString(w, chunk)
			rc.Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		for _, chunk := range rest {
			io.WriteString(w, chunk)
			rc.Flush()
		}
	})
}

func TestStreamsAreNotBuffered(t *testing.T) {
	tests := []struct {
		name, contentType string
		first, rest       []string
	}{
		{"sse", "text/event-stream", []string{"data: {\"token\":\"Hel\"}\n\n"}, []string{"data: {\"token\":\"lo\"}\n\n", "data: [DONE]\n\n"}},
		{"ndjson", "application/x-ndjson", []string{`{"response":"Hel","done":false}` + "\n"}, []string{`{"response":"lo","done":false}` + "\n", `{"done":true}` + "\n"}},
		{"ndjson with a json type", "application/json", []string{`{"response":"Hel"}` + "\n"}, []string{`{"done":true}` + "\n"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			api := newFakeAPI(t)
			release := make(chan struct{})
			node := streamingNode(t, tc.contentType, tc.first, tc.rest, release)
			const key = "key-streams-001"
			api.set(key, wl("w1", node.host, 1, "llm"))
			h := startProxy(t, api)

			req, _ := http.NewRequest(http.MethodPost, h.url+"/tags/llm/api/generate", strings.NewReader(`{"stream":true}`))
			req.Header.Set("X-C3-API-KEY", key)
			res, err := h.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			if ct := res.Header.Get("Content-Type"); ct != tc.contentType {
				t.Errorf("content type: got %q, want %q", ct, tc.contentType)
			}
			r := bufio.NewReader(res.Body)
			want := strings.Join(tc.first, "")
			var got []byte
			err = within(10*time.Second, func() error {
				got = make([]byte, len(want))
				_, err := io.ReadFull(r, got)
				return err
			})
			if err != nil {
				t.Fatalf("first chunk did not arrive while the node held the rest: %v", err)
			}
			if string(got) != want {
				t.Fatalf("first chunk: got %q, want %q", got, want)
			}
			close(release)
			rest, err := io.ReadAll(r)
			if err != nil || string(rest) != strings.Join(tc.rest, "") {
				t.Fatalf("rest: got %q, %v", rest, err)
			}
			h.waitIdle(t, node)
		})
	}
}

// wsNode accepts a WebSocket-style upgrade and echoes every byte back.
func wsNode(t *testing.T) *fakeNode {
	return newNode(t, "ws", false, func(w http.ResponseWriter, r *http.Request) {
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			http.Error(w, "want an upgrade", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
			r.Header.Get("Sec-WebSocket-Key")+"-accepted")
		brw.Flush()
		io.Copy(conn, brw)
	})
}

func TestWebSocketUpgrade(t *testing.T) {
	api := newFakeAPI(t)
	node := wsNode(t)
	const key = "key-websocket-1"
	api.set(key, wl("w1", node.host, 1, "comfy"))
	h := startProxy(t, api)

	conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /tags/comfy/ws?clientId=abc HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\nSec-WebSocket-Version: 13\r\nX-C3-API-KEY: %s\r\n\r\n", key)
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols || res.Header.Get("Sec-WebSocket-Accept") != "dGhlIHNhbXBsZQ==-accepted" {
		t.Fatalf("got %d %v, want 101 with the node's accept header", res.StatusCode, res.Header)
	}
	if h.inFlight(node) != 1 {
		t.Errorf("an open upgraded connection counts as in flight: got %d", h.inFlight(node))
	}
	for _, msg := range []string{"\x81\x05hello", "\x82\x03\x01\x02\x03", strings.Repeat("z", 70000)} {
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if err := within(10*time.Second, func() error { _, err := io.ReadFull(br, got); return err }); err != nil {
			t.Fatalf("echo: %v", err)
		}
		if string(got) != msg {
			t.Fatalf("echo: got %d bytes that differ from the %d sent", len(got), len(msg))
		}
	}
	conn.Close()
	h.waitIdle(t, node)
}

func TestSequentialRequestsRotate(t *testing.T) {
	api := newFakeAPI(t)
	nodes := []*fakeNode{newNode(t, "a", false, nil), newNode(t, "b", false, nil), newNode(t, "c", false, nil)}
	const key = "key-rotation-01"
	api.set(key, wl("wa", nodes[0].host, 1, "gpu"), wl("wb", nodes[1].host, 2, "gpu"), wl("wc", nodes[2].host, 3, "gpu"))
	h := startProxy(t, api)

	for _, path := range []string{"/tags/gpu/x", "/tags/all/x"} {
		counts := map[string]int{}
		const rounds = 30
		for range rounds {
			counts[h.get(t, path, key, 200)]++
		}
		for _, n := range nodes {
			if counts[n.name] != rounds/len(nodes) {
				t.Errorf("%s: %d sequential requests spread as %v, want %d each", path, rounds, counts, rounds/len(nodes))
			}
		}
	}
}

func TestLeastInFlightWins(t *testing.T) {
	api := newFakeAPI(t)
	release := make(chan struct{})
	slowOrFast := func(name string) *fakeNode {
		return newNode(t, name, false, func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				select {
				case <-release:
				case <-r.Context().Done():
				}
			}
			w.Header().Set("X-Node", name)
			io.WriteString(w, name)
		})
	}
	a, b := slowOrFast("a"), slowOrFast("b")
	const key = "key-leastbusy-1"
	api.set(key, wl("wa", a.host, 1, "gpu"), wl("wb", b.host, 2, "gpu"))
	h := startProxy(t, api)

	var wg sync.WaitGroup
	slow := func() {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodGet, h.url+"/tags/gpu/slow", nil)
			req.Header.Set("X-C3-API-KEY", key)
			if res, err := h.client.Do(req); err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
		})
	}
	// Two slow requests, one after the other is in flight: the second must
	// go to the idle node.
	slow()
	waitFor(t, 5*time.Second, func() bool { return h.inFlight(a)+h.inFlight(b) == 1 })
	slow()
	waitFor(t, 5*time.Second, func() bool { return h.inFlight(a)+h.inFlight(b) == 2 })
	if h.inFlight(a) != 1 || h.inFlight(b) != 1 {
		t.Fatalf("two slow requests: in flight a=%d b=%d, want 1 and 1", h.inFlight(a), h.inFlight(b))
	}
	// A third makes one node busier; every fast request must now avoid it.
	slow()
	waitFor(t, 5*time.Second, func() bool { return h.inFlight(a)+h.inFlight(b) == 3 })
	idle := "a"
	if h.inFlight(a) == 2 {
		idle = "b"
	}
	for i := range 10 {
		if got := h.get(t, "/tags/gpu/fast", key, 200); got != idle {
			t.Fatalf("fast request %d went to %s, want the less busy %s (a=%d b=%d)", i, got, idle, h.inFlight(a), h.inFlight(b))
		}
	}
	close(release)
	wg.Wait()
	h.waitIdle(t, a, b)
}

func TestInFlightReturnsToZero(t *testing.T) {
	api := newFakeAPI(t)
	held := make(chan struct{}, 1)
	node := newNode(t, "n", false, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold": // sends headers and a chunk, then waits for the client to leave
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: 1\n\n")
			http.NewResponseController(w).Flush()
			held <- struct{}{}
			<-r.Context().Done()
		case "/die": // breaks the stream half way
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: 1\n\n")
			http.NewResponseController(w).Flush()
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close()
			}
		case "/hang": // never answers until the client leaves
			held <- struct{}{}
			<-r.Context().Done()
		default:
			io.Copy(io.Discard, r.Body)
			io.WriteString(w, "ok")
		}
	})
	dead := newNode(t, "dead", false, nil)
	dead.srv.Close()
	const key = "key-inflight-01"
	api.set(key, wl("w1", node.host, 1, "t"), wl("w2", dead.host, 2, "gone"))
	h := startProxy(t, api)

	t.Run("completed", func(t *testing.T) {
		for _, size := range []int{0, 100, 64 << 10, 3 << 20} {
			res, _ := h.do(t, http.MethodPost, "/tags/t/ok", key, strings.NewReader(strings.Repeat("b", size)))
			if res.StatusCode != 200 {
				t.Fatalf("status %d", res.StatusCode)
			}
		}
		h.waitIdle(t, node)
	})
	t.Run("node refused", func(t *testing.T) {
		res, body := h.do(t, http.MethodGet, "/1/x", key, nil)
		if res.StatusCode != http.StatusBadGateway {
			t.Fatalf("got %d, want 502", res.StatusCode)
		}
		if msg := errorBody(t, res, body); !strings.Contains(msg, dead.host) || strings.Contains(msg, key) {
			t.Errorf("502 message %q must name the node %s and not the key", msg, dead.host)
		}
		h.waitIdle(t, dead)
	})
	for _, path := range []string{"/tags/t/hold", "/tags/t/hang"} {
		t.Run("client cancels "+path, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, h.url+path, nil)
			req.Header.Set("X-C3-API-KEY", key)
			go func() {
				<-held
				if h.inFlight(node) != 1 {
					t.Errorf("while held: in flight %d, want 1", h.inFlight(node))
				}
				cancel()
			}()
			res, err := h.client.Do(req)
			if err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
			h.waitIdle(t, node)
		})
	}
	t.Run("node dies mid-stream", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, h.url+"/tags/t/die", nil)
		req.Header.Set("X-C3-API-KEY", key)
		res, err := h.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err == nil {
			t.Errorf("a broken stream must end in an error the client can see; got a clean end after %q", body)
		}
		h.waitIdle(t, node)
	})
}

// panicTransport stands for a bug inside the proxy's forwarding.
type panicTransport struct{}

func (panicTransport) RoundTrip(*http.Request) (*http.Response, error) { panic("bug") }

func TestUnexpectedFailureIs500(t *testing.T) {
	api := newFakeAPI(t)
	node := newNode(t, "n", false, nil)
	const key = "key-internal-01"
	api.set(key, wl("w1", node.host, 1))
	h := startProxy(t, api, func(_ *config, p *proxy) {
		if p != nil {
			p.rp.Transport = panicTransport{}
		}
	})
	res, body := h.do(t, http.MethodGet, "/0/x", key, nil)
	if res.StatusCode != http.StatusInternalServerError {
		t.Fatalf("got %d %s, want 500", res.StatusCode, body)
	}
	if msg := errorBody(t, res, body); strings.Contains(msg, "bug") || strings.Contains(msg, key) {
		t.Errorf("500 body leaks internals: %q", msg)
	}
	h.waitIdle(t, node)
	if !strings.Contains(h.logs.String(), "level=ERROR") {
		t.Errorf("the panic was not logged at ERROR")
	}
}

func TestAPIErrors(t *testing.T) {
	api := newFakeAPI(t)
	h := startProxy(t, api)
	tests := []struct {
		name   string
		answer apiAnswer
		status int
		msg    string
	}{
		{"401", apiAnswer{status: 401, body: `{}`}, 401, "rejected"},
		{"403", apiAnswer{status: 403, body: `{}`}, 401, "rejected"},
		{"500", apiAnswer{status: 500, body: `oops`}, 502, "Comput3 API"},
		{"503", apiAnswer{status: 503, body: ``}, 502, "Comput3 API"},
		{"garbage", apiAnswer{status: 200, body: `<html>`}, 502, "Comput3 API"},
		{"object", apiAnswer{status: 200, body: `{"workloads":[]}`}, 502, "Comput3 API"},
		{"truncated", apiAnswer{status: 200, body: `[{"workload":"w1","node":"a`}, 502, "Comput3 API"},
		{"wrong shape", apiAnswer{status: 200, body: `[{"workload":1}]`}, 502, "Comput3 API"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			key := fmt.Sprintf("key-apierror-%02d", i)
			api.answer(key, tc.answer)
			for _, path := range []string{"/0/x", "/workloads", "/tags/all"} {
				res, body := h.do(t, http.MethodGet, path, key, nil)
				if res.StatusCode != tc.status {
					t.Fatalf("%s: got %d %s, want %d", path, res.StatusCode, body, tc.status)
				}
				if msg := errorBody(t, res, body); !strings.Contains(msg, tc.msg) || strings.Contains(msg, key) {
					t.Fatalf("%s: message %q must mention %q and not the key", path, msg, tc.msg)
				}
			}
		})
	}
	t.Run("unreachable", func(t *testing.T) {
		h := startProxy(t, newFakeAPI(t), withConfig(func(c *config) { c.apiURL, _ = c.apiURL.Parse("http://127.0.0.1:1/api/v0") }))
		res, body := h.do(t, http.MethodGet, "/0/x", "key-unreachable-1", nil)
		if res.StatusCode != http.StatusBadGateway {
			t.Fatalf("got %d, want 502", res.StatusCode)
		}
		errorBody(t, res, body)
	})
	t.Run("no workloads", func(t *testing.T) {
		api.set("key-empty-00001")
		h.get(t, "/0/x", "key-empty-00001", 404)
		h.get(t, "/tags/all/x", "key-empty-00001", 404)
		if body := h.get(t, "/workloads", "key-empty-00001", 200); strings.TrimSpace(body) != "[]" {
			t.Fatalf("empty listing: got %q, want []", body)
		}
	})
}

func TestBodiesThroughEveryPath(t *testing.T) {
	api := newFakeAPI(t)
	a, b := echoNode(t, "a"), echoNode(t, "b")
	const key = "key-bodies-0001"
	api.set(key, wl("wa", a.host, 1, "t"), wl("wb", b.host, 2, "t"))
	h := startProxy(t, api)

	sizes := []int{0, 1, 1000, 32 << 10, 64<<10 + 3, 1 << 20}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for _, path := range []string{"/0/echo", "/1/echo", "/tags/t/echo", "/tags/all/echo"} {
		for _, size := range sizes {
			wg.Go(func() {
				payload := strings.Repeat(string(rune('a'+size%26)), size)
				for range 5 {
					req, _ := http.NewRequest(http.MethodPost, h.url+path, strings.NewReader(payload))
					req.Header.Set("X-C3-API-KEY", key)
					res, err := h.client.Do(req)
					if err != nil {
						errs <- err
						return
					}
					got, err := io.ReadAll(res.Body)
					res.Body.Close()
					if err != nil || res.StatusCode != 200 || string(got) != payload {
						errs <- fmt.Errorf("%s %d bytes: status %d, got %d bytes, %v", path, size, res.StatusCode, len(got), err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	h.waitIdle(t, a, b)
}

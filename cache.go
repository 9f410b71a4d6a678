package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// defaultMissRefetchAfter is how old a snapshot must be, and how long
	// ago the last fetch of its key must have started, before a request
	// that found no node for its route may trigger a re-fetch.
	defaultMissRefetchAfter = 5 * time.Second
	// maxWorkloadsBody caps the Comput3 answer read into memory.
	maxWorkloadsBody = 8 << 20
	// defaultRejectFor is how long a key the API rejected gets 401 without a call.
	defaultRejectFor = 30 * time.Second
	// maxRejected bounds the memory of rejected keys (about 100 bytes each).
	maxRejected = 1 << 17
)

var (
	errKeyRejected    = errors.New("the Comput3 API rejected the key")
	errAPIUnavailable = errors.New("the Comput3 API failed")
	errTooManyKeys    = errors.New("too many API keys in use: try again later")
)

// workload is the part of a Comput3 workload that routing needs;
// unknown fields are ignored here and kept in the raw copy.
type workload struct {
	ID      string   `json:"workload"`
	Node    string   `json:"node"`
	Status  string   `json:"status"`
	Running bool     `json:"running"`
	Created float64  `json:"created"`
	Tags    []string `json:"tags"`
}

func (w *workload) routable() bool {
	return w.Running && w.Status == "running" && w.Node != ""
}

// nodeSet lists nodes as parallel slices: hosts for the balancer, bases
// for the forwarded URL.
type nodeSet struct {
	hosts []string
	bases []*url.URL
}

func (s *nodeSet) add(host string, base *url.URL) {
	s.hosts = append(s.hosts, host)
	s.bases = append(s.bases, base)
}

// snapshot is one fetched workload list of a key, ready for routing.
// It is never modified after newSnapshot returns.
type snapshot struct {
	fetchedAt time.Time
	// workloads is every workload as the API sent it: the routable ones
	// first, in index order, then the others in the API's order.
	workloads []json.RawMessage
	parsed    []workload // parallel to workloads
	indexed   nodeSet    // routable workloads in index order, one per workload
	all       nodeSet    // routable nodes, one per host, in index order
	tagged    map[string]*nodeSet
}

// decodeWorkloads parses the API's answer: a JSON array of workload objects.
// Anything else is an error, so that a garbled answer never replaces a good list.
func decodeWorkloads(body []byte) ([]json.RawMessage, []workload, error) {
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) == 0 || t[0] != '[' {
		return nil, nil, errors.New("answer is not a JSON array")
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(body, &raws); err != nil {
		return nil, nil, err
	}
	parsed := make([]workload, len(raws))
	for i, raw := range raws {
		if err := json.Unmarshal(raw, &parsed[i]); err != nil {
			return nil, nil, fmt.Errorf("workload %d: %w", i, err)
		}
	}
	return raws, parsed, nil
}

// nodeURL returns the base URL of a node given as host[:port] (reached
// with scheme) or as an http(s) URL used as-is.
func nodeURL(node, scheme string) (*url.URL, error) {
	raw := node
	if !strings.Contains(node, "://") {
		if strings.ContainsAny(node, "/?#@\\ ") {
			return nil, fmt.Errorf("node %q is not host[:port]", node)
		}
		raw = scheme + "://" + node
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return nil, fmt.Errorf("node %q: %w", node, err)
	case u.Scheme != "http" && u.Scheme != "https", u.Host == "", u.User != nil,
		u.RawQuery != "", u.Fragment != "", u.Opaque != "":
		return nil, fmt.Errorf("node %q is not a plain http(s) base URL", node)
	}
	return u, nil
}

// newSnapshot orders the workloads and indexes the routable ones by
// position and tag. It also returns the workloads whose node is unusable;
// they are treated as not routable.
func newSnapshot(raws []json.RawMessage, parsed []workload, scheme string, now time.Time) (*snapshot, []error) {
	var bad []error
	bases := make([]*url.URL, len(parsed))
	order := make([]int, 0, len(parsed))
	var rest []int
	for i := range parsed {
		if parsed[i].routable() {
			u, err := nodeURL(parsed[i].Node, scheme)
			if err == nil {
				bases[i] = u
				order = append(order, i)
				continue
			}
			bad = append(bad, fmt.Errorf("workload %q: %w", parsed[i].ID, err))
		}
		rest = append(rest, i)
	}
	slices.SortStableFunc(order, func(a, b int) int {
		return cmp.Or(
			cmp.Compare(parsed[a].Created, parsed[b].Created),
			strings.Compare(parsed[a].ID, parsed[b].ID),
			strings.Compare(parsed[a].Node, parsed[b].Node))
	})

	s := &snapshot{
		fetchedAt: now,
		workloads: make([]json.RawMessage, 0, len(raws)), // [] rather than null when empty
		parsed:    make([]workload, 0, len(raws)),
		tagged:    map[string]*nodeSet{},
	}
	seen := map[string]bool{}
	for _, i := range order {
		w, base := &parsed[i], bases[i]
		s.workloads = append(s.workloads, raws[i])
		s.parsed = append(s.parsed, *w)
		s.indexed.add(base.Host, base)
		if seen[base.Host] {
			continue // balancing counts nodes, not workloads: the first base wins
		}
		seen[base.Host] = true
		s.all.add(base.Host, base)
		for _, tag := range w.Tags {
			set := s.tagged[tag]
			if set == nil {
				set = &nodeSet{}
				s.tagged[tag] = set
			}
			if !slices.Contains(set.hosts, base.Host) {
				set.add(base.Host, base)
			}
		}
	}
	for _, i := range rest {
		s.workloads = append(s.workloads, raws[i])
		s.parsed = append(s.parsed, parsed[i])
	}
	return s, bad
}

// withTag returns the routable nodes carrying tag, every routable node for
// the tag "all", or nil.
func (s *snapshot) withTag(tag string) *nodeSet {
	if tag == "all" {
		if len(s.all.hosts) == 0 {
			return nil
		}
		return &s.all
	}
	return s.tagged[tag]
}

// fingerprint returns the first 8 hex digits of the key's SHA-256.
// Logs and errors use it so that a key can never appear in either.
func fingerprint(key string) string { return sumFingerprint(sha256.Sum256([]byte(key))) }

// sumFingerprint is fingerprint for a key already hashed.
func sumFingerprint(sum [sha256.Size]byte) string { return hex.EncodeToString(sum[:4]) }

// fetchResult is how a workloads fetch ended, for the metrics.
type fetchResult uint8

const (
	fetchOK fetchResult = iota
	fetchError
	fetchRejected
	numFetchResults
)

var fetchResultNames = [numFetchResults]string{"ok", "error", "rejected"}

// fetchCall is one workloads fetch shared by every request waiting for it.
// snap and err are written before done is closed.
type fetchCall struct {
	done chan struct{}
	snap *snapshot
	err  error
}

// await waits for call or for ctx, whichever ends first, so that a waiter
// that gives up fails no one else.
func await(ctx context.Context, call *fetchCall) (*snapshot, error) {
	select {
	case <-call.done:
		return call.snap, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// entry is the cached state of one key.
type entry struct {
	key      string // the API key; never logged, use fp
	sum      [sha256.Size]byte
	fp       string
	snap     atomic.Pointer[snapshot] // last good list; nil until the first fetch succeeds
	lastUsed atomic.Int64             // unix nanoseconds of the last request
	active   atomic.Int64             // requests of this key being served now

	mu          sync.Mutex // guards pending and lastAttempt
	pending     *fetchCall // the fetch in progress, if any
	lastAttempt time.Time  // when the last fetch started
}

// done ends a request counted by cache.get.
func (e *entry) done() { e.active.Add(-1) }

// cache holds the workload list of every key in use and keeps it fresh.
type cache struct {
	workloadsURL    string
	client          *http.Client
	nodeScheme      string
	refreshInterval time.Duration
	idleTimeout     time.Duration
	fetchTimeout    time.Duration // bounds one fetch, shared by its waiters
	maxKeys         int
	slots           chan struct{} // one per fetch allowed at once
	// missRefetchAfter limits re-fetches caused by requests that found no
	// node for their route to one per key per missRefetchAfter.
	missRefetchAfter time.Duration
	rejectFor        time.Duration // how long a rejected key gets 401 without a call
	log              *slog.Logger

	mu      sync.RWMutex // guards entries
	entries map[string]*entry

	fetches      [numFetchResults]atomic.Int64 // workloads fetches by result
	fetchSeconds histogram                     // how long they took

	rejectMu sync.Mutex                  // guards rejected
	rejected map[[sha256.Size]byte]int64 // key hash → unix ns until which it gets 401 without a call

	stopped chan struct{} // closed when refreshLoop returns
}

func newCache(apiURL *url.URL, client *http.Client, cfg config, log *slog.Logger) *cache {
	return &cache{
		workloadsURL:     apiURL.JoinPath("workloads").String(),
		client:           client,
		nodeScheme:       cfg.nodeScheme,
		refreshInterval:  cfg.refreshInterval,
		idleTimeout:      cfg.idleTimeout,
		fetchTimeout:     cfg.apiTimeout,
		maxKeys:          cfg.maxKeys,
		slots:            make(chan struct{}, cfg.apiConcurrency),
		missRefetchAfter: defaultMissRefetchAfter,
		rejectFor:        defaultRejectFor,
		log:              log,
		entries:          map[string]*entry{},
		rejected:         map[[sha256.Size]byte]int64{},
		stopped:          make(chan struct{}),
	}
}

// get returns the entry and current snapshot of key, fetching the list first
// when the key is not cached. On success the request counts as active on the
// entry until the caller calls e.done.
func (c *cache) get(ctx context.Context, key string, now time.Time) (*entry, *snapshot, error) {
	c.mu.RLock()
	e := c.entries[key]
	c.mu.RUnlock()
	if e == nil {
		var err error
		if e, err = c.add(key, now); err != nil {
			return nil, nil, err
		}
	}
	e.lastUsed.Store(now.UnixNano())
	e.active.Add(1)
	snap := e.snap.Load()
	if snap == nil {
		var err error
		if snap, err = c.first(ctx, e, now); err != nil {
			e.done()
			return nil, nil, err
		}
	}
	return e, snap, nil
}

// add makes the entry of a key not cached yet, unless the API rejected the
// key moments ago. At maxKeys, the least recently used key with nothing in
// flight makes room.
func (c *cache) add(key string, now time.Time) (*entry, error) {
	sum := sha256.Sum256([]byte(key))
	if c.rejectedRecently(sum, now) {
		return nil, errKeyRejected
	}
	c.mu.Lock()
	if e := c.entries[key]; e != nil {
		c.mu.Unlock()
		return e, nil
	}
	var evicted *entry
	if len(c.entries) >= c.maxKeys {
		if evicted = c.evictLRULocked(); evicted == nil {
			c.mu.Unlock()
			return nil, errTooManyKeys
		}
	}
	e := &entry{key: key, sum: sum, fp: sumFingerprint(sum)}
	c.entries[key] = e
	c.mu.Unlock()
	if evicted != nil {
		c.log.Info("key evicted", "key", evicted.fp, "reason", "cache full")
	}
	return e, nil
}

// evictLRULocked removes and returns the least recently used entry with
// nothing in flight, or nil when every entry is busy.
func (c *cache) evictLRULocked() *entry {
	var lru *entry
	var lruUsed int64
	for _, e := range c.entries {
		if used := e.lastUsed.Load(); e.active.Load() == 0 && (lru == nil || used < lruUsed) {
			lru, lruUsed = e, used
		}
	}
	if lru != nil {
		delete(c.entries, lru.key)
	}
	return lru
}

func (c *cache) rejectedRecently(sum [sha256.Size]byte, now time.Time) bool {
	c.rejectMu.Lock()
	defer c.rejectMu.Unlock()
	until, ok := c.rejected[sum]
	if ok && now.UnixNano() >= until {
		delete(c.rejected, sum)
		return false
	}
	return ok
}

// reject remembers for c.rejectFor that the API rejected a key. When full,
// it forgets the expired keys, then arbitrary ones: forgetting costs one
// more API call at most, never a wrong answer.
func (c *cache) reject(sum [sha256.Size]byte, now time.Time) {
	c.rejectMu.Lock()
	defer c.rejectMu.Unlock()
	if len(c.rejected) >= maxRejected {
		nowNS := now.UnixNano()
		for k, until := range c.rejected {
			if nowNS >= until {
				delete(c.rejected, k)
			}
		}
		for k := range c.rejected {
			if len(c.rejected) < maxRejected*7/8 {
				break
			}
			delete(c.rejected, k)
		}
	}
	c.rejected[sum] = now.Add(c.rejectFor).UnixNano()
}

// first waits for the first list of e, joining the fetch in progress so that
// concurrent first requests for one key cost one API call.
func (c *cache) first(ctx context.Context, e *entry, now time.Time) (*snapshot, error) {
	e.mu.Lock()
	if s := e.snap.Load(); s != nil {
		e.mu.Unlock()
		return s, nil
	}
	call := e.pending
	if call == nil {
		call = c.startFetchLocked(e, now, false)
	}
	e.mu.Unlock()
	return await(ctx, call)
}

// refetch is called when a request found no node for its route in snap.
// When snap is older than c.missRefetchAfter it waits for a shared fetch (at
// most one started per key per c.missRefetchAfter) and returns the new list;
// otherwise, or when that fetch fails, it returns snap.
func (c *cache) refetch(ctx context.Context, e *entry, snap *snapshot, now time.Time) (*snapshot, error) {
	if now.Sub(snap.fetchedAt) < c.missRefetchAfter {
		return snap, nil
	}
	e.mu.Lock()
	call := e.pending
	if call == nil {
		if now.Sub(e.lastAttempt) < c.missRefetchAfter {
			e.mu.Unlock()
			return snap, nil
		}
		call = c.startFetchLocked(e, now, false)
	}
	e.mu.Unlock()
	fresh, err := await(ctx, call)
	switch {
	case err == nil:
		return fresh, nil
	case errors.Is(err, errAPIUnavailable):
		return snap, nil // stale beats nothing: the caller answers from the last good list
	}
	return nil, err
}

// startFetchLocked starts fetching the list of e in its own goroutine,
// under its own timeout: no waiter's context can cancel it. The fetch takes
// one of c.slots first, unless the caller already holds one for it.
func (c *cache) startFetchLocked(e *entry, now time.Time, haveSlot bool) *fetchCall {
	call := &fetchCall{done: make(chan struct{})}
	e.pending, e.lastAttempt = call, now
	go func() {
		if !haveSlot {
			c.slots <- struct{}{}
		}
		defer func() { <-c.slots }()
		ctx, cancel := context.WithTimeout(context.Background(), c.fetchTimeout)
		defer cancel()
		start := time.Now()
		snap, err := c.fetchWorkloads(ctx, e)
		c.fetchSeconds.observe(time.Since(start))
		switch {
		case err == nil:
			c.fetches[fetchOK].Add(1)
		case errors.Is(err, errKeyRejected):
			c.fetches[fetchRejected].Add(1)
		default:
			c.fetches[fetchError].Add(1)
		}
		c.settle(e, snap, err)
		call.snap, call.err = snap, err
		close(call.done)
	}()
	return call
}

// settle records the outcome of a fetch of e: a new list replaces the old
// one; a rejected key, or a key that never had a list, leaves the cache.
func (c *cache) settle(e *entry, snap *snapshot, err error) {
	e.mu.Lock()
	old := e.snap.Load()
	if err == nil {
		e.snap.Store(snap)
	}
	e.pending = nil
	e.mu.Unlock()

	switch {
	case err == nil:
		c.logChanges(e.fp, old, snap)
	case errors.Is(err, errKeyRejected):
		c.drop(e)
		c.reject(e.sum, time.Now())
		// DEBUG: a flood of made-up keys must not flood the log.
		c.log.Debug("key rejected by the Comput3 API", "key", e.fp)
	case old == nil:
		c.drop(e)
		c.log.Warn("workloads fetch failed", "key", e.fp, "err", err)
	default:
		c.log.Warn("workloads refresh failed, keeping the last good list",
			"key", e.fp, "age", time.Since(old.fetchedAt).Round(time.Second), "err", err)
	}
}

// drop removes e from the cache if it is still the entry of its key.
func (c *cache) drop(e *entry) {
	c.mu.Lock()
	if c.entries[e.key] == e {
		delete(c.entries, e.key)
	}
	c.mu.Unlock()
}

// fetchWorkloads asks the Comput3 API for the running workloads of e's key.
func (c *cache) fetchWorkloads(ctx context.Context, e *entry) (*snapshot, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.workloadsURL, strings.NewReader(`{"running": true}`))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errAPIUnavailable, err)
	}
	req.Header.Set("X-C3-API-KEY", e.key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	res, err := c.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errAPIUnavailable, err)
	}
	defer res.Body.Close()
	switch {
	case res.StatusCode == http.StatusUnauthorized || res.StatusCode == http.StatusForbidden:
		return nil, errKeyRejected
	case res.StatusCode < 200 || res.StatusCode > 299:
		return nil, fmt.Errorf("%w: status %d", errAPIUnavailable, res.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(res.Body, maxWorkloadsBody+1))
	if err != nil {
		return nil, fmt.Errorf("%w: reading the answer: %w", errAPIUnavailable, err)
	}
	if len(body) > maxWorkloadsBody {
		return nil, fmt.Errorf("%w: answer larger than %d bytes", errAPIUnavailable, maxWorkloadsBody)
	}
	raws, parsed, err := decodeWorkloads(body)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errAPIUnavailable, err)
	}
	snap, bad := newSnapshot(raws, parsed, c.nodeScheme, time.Now())
	for _, err := range bad {
		c.log.Warn("workload not routable", "key", e.fp, "err", err)
	}
	return snap, nil
}

// logChanges logs a key's first list, and then the nodes and workload
// statuses that changed between two lists.
func (c *cache) logChanges(fp string, old, cur *snapshot) {
	if old == nil {
		c.log.Info("key activated", "key", fp, "workloads", len(cur.workloads), "routable", len(cur.indexed.hosts))
		return
	}
	for _, h := range cur.all.hosts {
		if !slices.Contains(old.all.hosts, h) {
			c.log.Info("node added", "key", fp, "node", h)
		}
	}
	for _, h := range old.all.hosts {
		if !slices.Contains(cur.all.hosts, h) {
			c.log.Info("node removed", "key", fp, "node", h)
		}
	}
	was := make(map[string]string, len(old.parsed))
	for _, w := range old.parsed {
		was[w.ID] = w.Status
	}
	for _, w := range cur.parsed {
		before, ok := was[w.ID]
		delete(was, w.ID)
		if !ok {
			before = "absent"
		}
		if before != w.Status {
			c.log.Info("workload status changed", "key", fp, "workload", w.ID, "from", before, "to", w.Status)
		}
	}
	for id, before := range was {
		c.log.Info("workload status changed", "key", fp, "workload", id, "from", before, "to", "absent")
	}
}

// refreshLoop re-fetches active keys and evicts idle ones every
// refreshInterval until ctx ends; afterTick, if not nil, runs after each
// round. It closes c.stopped on return so shutdown can wait for it.
func (c *cache) refreshLoop(ctx context.Context, afterTick func()) {
	defer close(c.stopped)
	tick := time.NewTicker(c.refreshInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			c.refreshAll(ctx, now)
			if afterTick != nil {
				afterTick()
			}
		}
	}
}

// refreshAll evicts the keys idle for longer than idleTimeout with nothing
// in flight and starts one fetch per remaining key, each in its own
// goroutine. It does not wait for them: a key whose fetch hangs holds up no
// other key and no later tick, and since a key with a fetch in progress is
// skipped, fetches never pile up. It waits only for a free fetch slot
// before starting the next, so a round never parks more goroutines than
// there are slots. A key fetched within the last half interval (its first
// request, or a miss re-fetch) waits for the next round.
func (c *cache) refreshAll(ctx context.Context, now time.Time) {
	c.mu.RLock()
	entries := slices.Collect(maps.Values(c.entries))
	c.mu.RUnlock()

	for _, e := range entries {
		if c.idle(e, now) {
			c.evict(e, now)
			continue
		}
		if !c.refreshDue(e, now) {
			continue
		}
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		e.mu.Lock()
		if c.refreshDueLocked(e, now) {
			c.startFetchLocked(e, now, true)
		} else {
			<-c.slots
		}
		e.mu.Unlock()
	}
}

func (c *cache) refreshDue(e *entry, now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return c.refreshDueLocked(e, now)
}

func (c *cache) refreshDueLocked(e *entry, now time.Time) bool {
	return e.pending == nil && now.Sub(e.lastAttempt) >= c.refreshInterval/2
}

// idle reports whether e may be evicted: unused for longer than
// idleTimeout, nothing in flight, and no fetch running (one that finished
// after the eviction would have called the API for a key no longer cached).
func (c *cache) idle(e *entry, now time.Time) bool {
	if now.Sub(time.Unix(0, e.lastUsed.Load())) <= c.idleTimeout || e.active.Load() != 0 {
		return false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pending == nil
}

// evict removes e if it is still idle: a request may have arrived since.
func (c *cache) evict(e *entry, now time.Time) {
	c.mu.Lock()
	gone := c.entries[e.key] == e && c.idle(e, now)
	if gone {
		delete(c.entries, e.key)
	}
	c.mu.Unlock()
	if gone {
		c.log.Info("key evicted", "key", e.fp, "idle", now.Sub(time.Unix(0, e.lastUsed.Load())).Round(time.Second))
	}
}

// size returns the number of keys cached.
func (c *cache) size() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}

// nodeHosts returns the host of every routable node of every cached key.
func (c *cache) nodeHosts() map[string]bool {
	hosts := map[string]bool{}
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, e := range c.entries {
		if s := e.snap.Load(); s != nil {
			for _, h := range s.all.hosts {
				hosts[h] = true
			}
		}
	}
	return hosts
}

package main

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Passive health: a node that fails downAfter times in a row is skipped by
// tag routing for a cooldown that starts at minCooldown and doubles with
// every further failure, up to maxCooldown. One success clears it.
const (
	downAfter   = 3
	minCooldown = 5 * time.Second
	maxCooldown = 60 * time.Second
)

// failReason says how a node failed a request; the metrics count each.
type failReason uint8

const (
	failConnect   failReason = iota // connection refused or unreachable
	failDNS                         // the node's name did not resolve
	failTLS                         // handshake or certificate
	failReset                       // connection closed or reset before the response
	failTimeout                     // a dial or handshake timed out
	failMidStream                   // the body broke after the response started
	failOther
	numFailReasons
)

var failReasonNames = [numFailReasons]string{"connect", "dns", "tls", "reset", "timeout", "mid_stream", "other"}

// maxStatus bounds the status codes counted one by one; HTTP has three digits.
const maxStatus = 1000

// nodeLoad is the live state of one node, shared by every key that routes to it.
type nodeLoad struct {
	host       string
	hostHeader []string     // {host}: the X-C3-Node value, shared read-only
	inFlight   atomic.Int64 // requests forwarded to the node and not yet finished
	failures   atomic.Int64 // consecutive failures before a response
	downUntil  atomic.Int64 // unix ns until which tag routing skips the node; 0 when up
	lastFailed atomic.Int64 // unix ns of the last failure

	answered [maxStatus]atomic.Int64      // responses by status code
	failed   [numFailReasons]atomic.Int64 // failures by reason
}

// countAnswer counts a response of the node with status code.
func (n *nodeLoad) countAnswer(code int) {
	if code >= 0 && code < maxStatus {
		n.answered[code].Add(1)
	}
}

// countFailure counts a failure of the node.
func (n *nodeLoad) countFailure(reason failReason) { n.failed[reason].Add(1) }

// cooling reports whether tag routing should skip n at now.
func (n *nodeLoad) cooling(now int64) bool { return n.downUntil.Load() > now }

// balancer chooses nodes and counts the requests in flight on each.
//
// Readers never lock: the host → load map is copied on write, and writes
// happen only when a node is seen for the first time or swept away.
type balancer struct {
	mu    sync.Mutex                           // serialises writers of loads
	loads atomic.Pointer[map[string]*nodeLoad] // never nil after newBalancer
	turn  atomic.Uint64                        // rotation cursor that breaks ties
}

func newBalancer() *balancer {
	b := &balancer{}
	b.loads.Store(&map[string]*nodeLoad{})
	return b
}

// load returns the state of host, creating it the first time host is seen.
func (b *balancer) load(host string) *nodeLoad {
	if n := (*b.loads.Load())[host]; n != nil {
		return n
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.loads.Load()
	if n := old[host]; n != nil {
		return n
	}
	n := &nodeLoad{host: host, hostHeader: []string{host}}
	next := make(map[string]*nodeLoad, len(old)+1)
	maps.Copy(next, old)
	next[host] = n
	b.loads.Store(&next)
	return n
}

// acquire counts one more request in flight on host. The caller must pass
// the result to release exactly once, whatever happens to the request.
func (b *balancer) acquire(host string) *nodeLoad {
	n := b.load(host)
	n.inFlight.Add(1)
	return n
}

// release ends a request counted by acquire or pickLeastBusy.
func (b *balancer) release(n *nodeLoad) {
	n.inFlight.Add(-1)
}

// pickLeastBusy returns the index in hosts of the node with the fewest
// requests in flight, already acquired, or -1 and nil when every host is in
// skip. Nodes cooling down after failures are passed over; when all the
// others are cooling, the one that failed longest ago is tried anyway. Ties
// go to the first tied node at or after a cursor that advances on every
// call, so that sequential requests rotate over idle nodes instead of always
// hitting the first one.
func (b *balancer) pickLeastBusy(hosts []string, now time.Time, skip []*nodeLoad) (int, *nodeLoad) {
	if len(hosts) == 0 {
		return -1, nil
	}
	start := int(b.turn.Add(1) % uint64(len(hosts)))
	nowNS := now.UnixNano()
	best, cool := -1, -1
	var bestLoad, coolLoad *nodeLoad
	var bestCount, coolFailed int64
	for j := range hosts {
		i := start + j
		if i >= len(hosts) {
			i -= len(hosts)
		}
		n := b.load(hosts[i])
		if skipped(skip, n) {
			continue
		}
		if n.cooling(nowNS) {
			if f := n.lastFailed.Load(); cool < 0 || f < coolFailed {
				cool, coolLoad, coolFailed = i, n, f
			}
			continue
		}
		if c := n.inFlight.Load(); best < 0 || c < bestCount {
			best, bestLoad, bestCount = i, n, c
		}
	}
	if best < 0 {
		best, bestLoad = cool, coolLoad
	}
	if bestLoad != nil {
		bestLoad.inFlight.Add(1)
	}
	return best, bestLoad
}

func skipped(skip []*nodeLoad, n *nodeLoad) bool {
	for _, s := range skip {
		if s == n {
			return true
		}
	}
	return false
}

// failed records that n failed before answering. It returns the cooldown
// when n is down (from the downAfter-th failure in a row on), 0 otherwise,
// and whether this failure is the one that took n down.
func (b *balancer) failed(n *nodeLoad, now time.Time, reason failReason) (cooldown time.Duration, wentDown bool) {
	n.countFailure(reason)
	n.lastFailed.Store(now.UnixNano())
	f := n.failures.Add(1)
	if f < downAfter {
		return 0, false
	}
	cooldown = maxCooldown
	if shift := f - downAfter; shift < 4 {
		cooldown = min(minCooldown<<shift, maxCooldown)
	}
	n.downUntil.Store(now.Add(cooldown).UnixNano())
	return cooldown, f == downAfter
}

// succeeded records that n answered; it reports whether n was down.
func (b *balancer) succeeded(n *nodeLoad) bool {
	if n.failures.Load() == 0 { // the common case costs one atomic load
		return false
	}
	n.failures.Store(0)
	return n.downUntil.Swap(0) != 0
}

// nodes returns the state of every node known, sorted by host.
func (b *balancer) nodes() []*nodeLoad {
	loads := slices.Collect(maps.Values(*b.loads.Load()))
	slices.SortFunc(loads, func(x, y *nodeLoad) int { return strings.Compare(x.host, y.host) })
	return loads
}

// retain forgets every idle node for which keep reports false, so that the
// map follows the nodes the cached keys still use. A request that picked a
// node just before it was forgotten still releases the load it holds.
func (b *balancer) retain(keep func(host string) bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.loads.Load()
	next := make(map[string]*nodeLoad, len(old))
	for host, n := range old {
		if keep(host) || n.inFlight.Load() != 0 {
			next[host] = n
		}
	}
	if len(next) != len(old) {
		b.loads.Store(&next)
	}
}

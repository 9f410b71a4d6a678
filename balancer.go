package main

import (
	"maps"
	"sync"
	"sync/atomic"
)

// nodeLoad is the live state of one node, shared by every key that routes to it.
type nodeLoad struct {
	host     string
	inFlight atomic.Int64 // requests forwarded to the node and not yet finished
}

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
	n := &nodeLoad{host: host}
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
// requests in flight, already acquired. Ties go to the first tied node at or
// after a cursor that advances on every call, so that sequential requests
// rotate over idle nodes instead of always hitting the first one.
// hosts must not be empty.
func (b *balancer) pickLeastBusy(hosts []string) (int, *nodeLoad) {
	start := int(b.turn.Add(1) % uint64(len(hosts)))
	best, bestLoad := -1, (*nodeLoad)(nil)
	var bestCount int64
	for j := range hosts {
		i := start + j
		if i >= len(hosts) {
			i -= len(hosts)
		}
		n := b.load(hosts[i])
		if c := n.inFlight.Load(); best < 0 || c < bestCount {
			best, bestLoad, bestCount = i, n, c
		}
	}
	bestLoad.inFlight.Add(1)
	return best, bestLoad
}

// inFlight reports the requests in flight on host (0 for an unknown host).
func (b *balancer) inFlight(host string) int64 {
	if n := (*b.loads.Load())[host]; n != nil {
		return n.inFlight.Load()
	}
	return 0
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

package main

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

func TestPickLeastBusy(t *testing.T) {
	b := newBalancer()
	hosts := []string{"a:1", "b:1", "c:1"}

	// Idle nodes take turns.
	counts := map[string]int{}
	for range 300 {
		i, n := b.pickLeastBusy(hosts, time.Now(), nil)
		counts[hosts[i]]++
		b.release(n)
	}
	for _, h := range hosts {
		if counts[h] != 100 {
			t.Fatalf("300 sequential picks over 3 idle nodes: %v, want 100 each", counts)
		}
	}

	// The least busy node wins whatever the cursor says.
	busy := []*nodeLoad{b.acquire("a:1"), b.acquire("a:1"), b.acquire("b:1")}
	for range 10 {
		i, n := b.pickLeastBusy(hosts, time.Now(), nil)
		if hosts[i] != "c:1" {
			t.Fatalf("picked %s with a=2 b=1 c=0", hosts[i])
		}
		b.release(n)
	}
	for _, n := range busy {
		b.release(n)
	}
	for _, h := range hosts {
		if got := b.inFlight(h); got != 0 {
			t.Errorf("%s: in flight %d after every release", h, got)
		}
	}
}

func TestPickLeastBusyConcurrent(t *testing.T) {
	b := newBalancer()
	hosts := make([]string, 16)
	for i := range hosts {
		hosts[i] = fmt.Sprintf("n%d:1", i)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 2000 {
				_, n := b.pickLeastBusy(hosts, time.Now(), nil)
				b.release(n)
			}
		})
	}
	wg.Wait()
	for _, h := range hosts {
		if got := b.inFlight(h); got != 0 {
			t.Errorf("%s: in flight %d", h, got)
		}
	}
}

func TestRetainForgetsOnlyUnusedIdleNodes(t *testing.T) {
	b := newBalancer()
	held := b.acquire("busy:1")
	b.release(b.acquire("kept:1"))
	b.release(b.acquire("gone:1"))
	b.retain(func(h string) bool { return h == "kept:1" })
	loads := *b.loads.Load()
	if _, ok := loads["gone:1"]; ok {
		t.Errorf("an unused idle node was kept")
	}
	if loads["kept:1"] == nil || loads["busy:1"] == nil {
		t.Errorf("a used or busy node was forgotten: %v", loads)
	}
	b.release(held)
	if got := b.inFlight("busy:1"); got != 0 {
		t.Errorf("busy node: in flight %d", got)
	}
}

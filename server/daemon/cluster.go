package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
	"github.com/keyissuer/keyissuer/server/admin"
)

// joinCluster takes this instance's id in the cluster (the postgres
// backend), before reconciliation: a second live instance with the same id
// stops here, before it touches anything.
func (d *Daemon) joinCluster(ctx context.Context) error {
	pg, ok := d.store.(*postgres.Store)
	if !ok {
		return nil
	}
	host, _ := os.Hostname()
	id := d.cfg.Cluster.InstanceID
	if id == "" {
		id = host
	}
	cl := pg.Cluster(id, host, d.cfg.Cluster.Lease)
	if err := cl.Join(ctx); err != nil {
		return err
	}
	d.cluster, d.instanceID = cl, id
	d.storeOK.Store(true)
	d.countInstances(ctx)
	d.ops.metrics.Cluster(func() int { return int(d.instances.Load()) }, cl.LastHeartbeat)
	d.log.Info("joined the cluster", "instance", id, "live_instances", d.instances.Load(),
		"heartbeat", d.cfg.Cluster.Heartbeat, "lease", d.cfg.Cluster.Lease)
	return nil
}

// issuerCluster is the issuer's view of the cluster: nil on one host.
func (d *Daemon) issuerCluster() issuer.Cluster {
	if d.cluster == nil {
		return nil
	}
	return d.cluster
}

// liveInstances is the public API's count of instances sharing the rate
// limits: nil on one host.
func (d *Daemon) liveInstances() func() int {
	if d.cluster == nil {
		return nil
	}
	return func() int { return int(d.instances.Load()) }
}

func (d *Daemon) countInstances(ctx context.Context) {
	if n, err := d.cluster.Live(ctx); err == nil {
		d.instances.Store(int32(n))
	}
}

// heartbeat renews the lease until ctx is done. A lease lost to a
// neighbour (this instance was cut off from PostgreSQL for longer than the
// lease, and was taken over) stops the daemon: its pooled keys are the
// neighbour's now, and a restart starts clean.
func (d *Daemon) heartbeat(ctx context.Context) error {
	tick := time.NewTicker(d.cfg.Cluster.Heartbeat)
	defer tick.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		st := d.issuer.Stats()
		// A slow heartbeat still renews the lease: it may take up to
		// half of it.
		hctx, cancel := context.WithTimeout(ctx, d.cfg.Cluster.Lease/2)
		err := d.cluster.Heartbeat(hctx, st.PoolReady, st.PendingDestroys)
		if err == nil {
			d.countInstances(hctx)
		}
		cancel()
		switch {
		case errors.Is(err, postgres.ErrLeaseLost):
			d.log.Error("stopping: this instance's cluster lease was lost", "instance", d.instanceID, "err", err)
			return fmt.Errorf("instance %s: %w", d.instanceID, err)
		case err != nil && !failing:
			d.log.Warn("cluster heartbeat failed; will retry", "instance", d.instanceID, "err", err)
		case err == nil && failing:
			d.log.Info("cluster heartbeat back", "instance", d.instanceID)
		}
		failing = err != nil
		d.storeOK.Store(!failing)
	}
}

// storeUp is keyissuer_store_up: a bolt store answers while it is open;
// PostgreSQL answered if the last heartbeat (every cluster.heartbeat)
// reached it.
func (d *Daemon) storeUp() bool { return d.cluster == nil || d.storeOK.Load() }

// leaveCluster ends the lease on a clean stop, once the pool is drained.
func (d *Daemon) leaveCluster(ctx context.Context) {
	if d.cluster == nil {
		return
	}
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := d.cluster.Leave(lctx); err != nil {
		d.log.Warn("failed to end the cluster lease; neighbours wait for it to run out", "err", err)
	}
}

// clusterStatus is the cluster's state for /v1/status; nil on one host.
func (d *Daemon) clusterStatus(ctx context.Context) *admin.Cluster {
	if d.cluster == nil {
		return nil
	}
	st, err := d.cluster.Status(ctx)
	out := &admin.Cluster{Self: d.instanceID, Instances: []admin.Instance{}, Outstanding: st.Outstanding,
		Consuming: st.Consuming, Orphaned: st.Orphaned}
	if err != nil {
		out.Err = err.Error()
	}
	for _, in := range st.Instances {
		out.Instances = append(out.Instances, admin.Instance{ID: in.ID, Host: in.Host, Live: in.Live,
			StartedAt: in.StartedAt, HeartbeatAt: in.HeartbeatAt, LeaseUntil: in.LeaseUntil,
			PoolReady: in.PoolReady, PoolKeys: in.PoolKeys, PendingDestroys: in.PendingDestroys})
	}
	return out
}

// The cluster's replay cache (a table in PostgreSQL) is pruned every
// replayPruneInterval by each instance, replayPruneBatch digests a
// statement, for at most replayPruneTime a round: short statements that
// neither hold locks long nor compete with the applies for long.
const (
	replayPruneInterval = time.Minute
	replayPruneBatch    = 10_000
	replayPruneTime     = 20 * time.Second
)

// pruneReplay deletes the replay cache's expired digests until ctx is
// done (cluster mode only). A failed round is retried at the next.
func (d *Daemon) pruneReplay(ctx context.Context, pg *postgres.Store) {
	every(ctx, replayPruneInterval, func() {
		pctx, cancel := context.WithTimeout(ctx, replayPruneTime)
		defer cancel()
		total := 0
		for {
			n, err := pg.PruneReplay(pctx, replayPruneBatch)
			total += n
			if err != nil {
				if ctx.Err() == nil {
					d.log.Warn("failed to prune the replay cache; will retry", "pruned", total, "err", err)
				}
				return
			}
			if n < replayPruneBatch {
				break
			}
		}
		if total > 0 {
			d.log.Debug("replay cache pruned", "digests", total)
		}
	})
}

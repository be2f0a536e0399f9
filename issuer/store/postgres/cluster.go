package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keyissuer/keyissuer/issuer/store"
)

// ErrTakenOver is [store.ErrTakenOver].
var ErrTakenOver = store.ErrTakenOver

// ErrLeaseLost means the instance's lease ran out and a neighbour took its
// id over; the instance must stop and start again.
var ErrLeaseLost = errors.New("cluster lease lost")

// Cluster is one instance's membership of a cluster: its heartbeat row,
// its pooled keys, and the cluster-wide steps of the issuer (see
// issuer.Cluster). It is safe for concurrent use.
type Cluster struct {
	s       *Store
	id      string
	host    string
	session string
	lease   time.Duration

	steadyFor time.Duration // see SetSteadyFor

	mu sync.Mutex
	// healthySince is when the heartbeat last started to succeed (zero:
	// it is failing). See TakeOver.
	healthySince time.Time
	lastBeat     time.Time // the last successful heartbeat (or the join)
}

// Cluster returns the membership of instance id (running on host) with
// the given lease. Call Join before anything else.
func (s *Store) Cluster(id, host string, lease time.Duration) *Cluster {
	b := make([]byte, 12)
	rand.Read(b)
	return &Cluster{s: s, id: id, host: host, session: hex.EncodeToString(b), lease: lease, steadyFor: lease}
}

// SetSteadyFor sets how long this instance's heartbeat must have succeeded
// before it takes over dead instances (default: the lease). Tests that end
// leases by hand set 0.
func (c *Cluster) SetSteadyFor(d time.Duration) { c.steadyFor = d }

// ID is the instance id.
func (c *Cluster) ID() string { return c.id }

func (c *Cluster) leaseArg() string { return fmt.Sprintf("%d microseconds", c.lease.Microseconds()) }

// Join takes the instance id for this process: it fails while another
// live instance holds it (its lease has not run out).
func (c *Cluster) Join(ctx context.Context) error {
	var session string
	err := c.s.pool.QueryRow(ctx, `INSERT INTO instances AS i (instance_id, session, host, started_at, heartbeat_at, lease_until)
		VALUES ($1, $2, $3, now(), now(), now() + $4::interval)
		ON CONFLICT (instance_id) DO UPDATE SET session = EXCLUDED.session, host = EXCLUDED.host,
			started_at = now(), heartbeat_at = now(), lease_until = EXCLUDED.lease_until
		WHERE i.lease_until < now() OR i.session = EXCLUDED.session
		RETURNING session`, c.id, c.session, c.host, c.leaseArg()).Scan(&session)
	if errors.Is(err, pgx.ErrNoRows) {
		var host string
		var beat, until time.Time
		c.s.pool.QueryRow(ctx, "SELECT host, heartbeat_at, lease_until FROM instances WHERE instance_id = $1", c.id).Scan(&host, &beat, &until)
		return fmt.Errorf("cluster.instance_id %q is held by a live instance (host %q, last heartbeat %s, lease until %s): "+
			"give each instance its own id; after a crash, the id is free once its lease has run out",
			c.id, host, beat.UTC().Format(time.RFC3339), until.UTC().Format(time.RFC3339))
	}
	if err != nil {
		return fmt.Errorf("failed to join the cluster as %s: %w", c.id, unavailable(err))
	}
	c.beat(true)
	return nil
}

// beat records whether a heartbeat (or the join) succeeded.
func (c *Cluster) beat(ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	switch {
	case !ok:
		c.healthySince = time.Time{}
		return
	case c.healthySince.IsZero():
		c.healthySince = now
	}
	c.lastBeat = now
}

// LastHeartbeat is when the lease was last renewed (or taken, by Join).
func (c *Cluster) LastHeartbeat() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastBeat
}

// steady reports whether this instance's heartbeat has succeeded for a
// whole lease (SetSteadyFor) without a failure.
func (c *Cluster) steady() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.healthySince.IsZero() && time.Since(c.healthySince) >= c.steadyFor
}

// Heartbeat renews the lease and publishes the pool's state. It fails with
// ErrLeaseLost if a neighbour took the id over meanwhile.
func (c *Cluster) Heartbeat(ctx context.Context, poolReady, pendingDestroys int) error {
	tag, err := c.s.pool.Exec(ctx, `UPDATE instances SET heartbeat_at = now(), lease_until = now() + $3::interval,
			pool_ready = $4, pending_destroys = $5
		WHERE instance_id = $1 AND session = $2`, c.id, c.session, c.leaseArg(), poolReady, pendingDestroys)
	c.beat(err == nil && tag.RowsAffected() == 1)
	if err != nil {
		return fmt.Errorf("heartbeat failed: %w", unavailable(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: instance %s was taken over by a neighbour after its lease ran out", ErrLeaseLost, c.id)
	}
	return nil
}

// Leave ends the lease at once, on a clean stop: the id is free, and what
// the instance leaves behind is cleaned up by the first neighbour to look.
func (c *Cluster) Leave(ctx context.Context) error {
	_, err := c.s.pool.Exec(ctx, "UPDATE instances SET lease_until = now() WHERE instance_id = $1 AND session = $2", c.id, c.session)
	return unavailable(err)
}

// Generating records, before the token makes it, that key id is being
// generated for this instance's pool: no neighbour may take its objects
// for a leak.
func (c *Cluster) Generating(ctx context.Context, id string) error {
	_, err := c.s.pool.Exec(ctx, "INSERT INTO pool_keys (unique_id, instance_id, state) VALUES ($1, $2, 'generating')", id, c.id)
	return unavailable(err)
}

// Pooled marks key id ready in this instance's pool. It fails with
// ErrTakenOver if a neighbour took it over meanwhile.
func (c *Cluster) Pooled(ctx context.Context, id string) error {
	tag, err := c.s.pool.Exec(ctx, "UPDATE pool_keys SET state = 'ready' WHERE unique_id = $1 AND instance_id = $2 AND state = 'generating'", id, c.id)
	if err != nil {
		return unavailable(err)
	}
	if tag.RowsAffected() == 0 {
		return ErrTakenOver
	}
	return nil
}

// Forget removes key id from the pool's records once its objects are
// destroyed (or were never made).
func (c *Cluster) Forget(ctx context.Context, id string) error {
	_, err := c.s.pool.Exec(ctx, "DELETE FROM pool_keys WHERE unique_id = $1 AND instance_id = $2", id, c.id)
	return unavailable(err)
}

// Issue turns pooled key r.UniqueID into record r, in one transaction,
// within caps counted over the whole cluster: the caps' scopes are locked
// (transaction-scoped advisory locks, always in the same order) before
// they are counted, so concurrent issues on any instances never pass a
// cap. It fails with a *store.CapError (nothing changed), or ErrTakenOver.
//
// The transaction is one round trip and one commit: its statements go in
// one pipeline, which PostgreSQL runs as one implicit transaction (all or
// nothing, committed at its end). The locks are statements of their own,
// before the statement that counts, deletes the pool entry and inserts the
// record: under READ COMMITTED that statement's snapshot is taken once
// every lock is held, so it counts every issue committed under them.
func (c *Cluster) Issue(ctx context.Context, r store.Record, caps store.Caps) error {
	scopes := []struct {
		name, key string
		limit     int
	}{
		{"total", "", caps.Total},
		{"client", r.ClientID, caps.Client},
		{"customer", r.CustomerID, caps.Customer},
	}
	counted := [3]bool{}
	b := &pgx.Batch{}
	for i, sc := range scopes {
		if sc.limit <= 0 || (sc.name != "total" && sc.key == "") {
			continue
		}
		counted[i] = true
		b.Queue("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "keyissuer quota "+sc.name+":"+sc.key)
	}
	// The counts of the scopes not capped are not made ($10..$12 false).
	var n [3]int
	var issued bool
	b.Queue(`WITH counts AS (SELECT
			CASE WHEN $10 THEN (SELECT count(*) FROM records WHERE state = 'issued') ELSE 0 END AS total,
			CASE WHEN $11 THEN (SELECT count(*) FROM records WHERE state = 'issued' AND client_id = $4) ELSE 0 END AS client,
			CASE WHEN $12 THEN (SELECT count(*) FROM records WHERE state = 'issued' AND customer_id = $3) ELSE 0 END AS customer),
		ok AS (SELECT (NOT $10 OR total < $13) AND (NOT $11 OR client < $14) AND (NOT $12 OR customer < $15) AS ok FROM counts),
		taken AS (DELETE FROM pool_keys WHERE unique_id = $1 AND instance_id = $9 AND state = 'ready' AND (SELECT ok FROM ok)
			RETURNING unique_id),
		made AS (INSERT INTO records (`+columns+`, instance_id)
			SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM taken RETURNING unique_id)
		SELECT total, client, customer, EXISTS (SELECT 1 FROM made) FROM counts`,
		r.UniqueID, r.Salt, r.CustomerID, r.ClientID, string(r.State), r.IssuedAt, r.ExpiresAt, nullTime(r.ClosedAt), c.id,
		counted[0], counted[1], counted[2], caps.Total, caps.Client, caps.Customer).
		QueryRow(func(row pgx.Row) error { return row.Scan(&n[0], &n[1], &n[2], &issued) })
	err := c.s.pool.SendBatch(ctx, b).Close()
	if err != nil {
		return fmt.Errorf("failed to issue key %s: %w", r.UniqueID, unavailable(err))
	}
	if issued {
		return nil
	}
	for i, sc := range scopes {
		if counted[i] && n[i] >= sc.limit {
			return &store.CapError{Scope: sc.name, Limit: sc.limit}
		}
	}
	return fmt.Errorf("failed to issue key %s: %w", r.UniqueID, ErrTakenOver)
}

// Claim is the decrypt's claim, issued → consuming, recording this
// instance as the claimant: should it die, a neighbour finishes the claim.
func (c *Cluster) Claim(ctx context.Context, id string, at time.Time) (store.Record, error) {
	return c.s.transition(ctx, id, store.Issued, store.Consuming, at, c.id)
}

// Owned reports which of ids have a live claim on their objects: an active
// record (issued or consuming), or a pool entry. Reconciliation destroys
// only the objects of the others.
func (c *Cluster) Owned(ctx context.Context, ids []string) (map[string]bool, error) {
	rows, err := c.s.pool.Query(ctx, `SELECT unique_id FROM records WHERE unique_id = ANY($1) AND state IN ('issued', 'consuming')
		UNION SELECT unique_id FROM pool_keys WHERE unique_id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("failed to read owners: %w", unavailable(err))
	}
	owned, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("failed to read owners: %w", unavailable(err))
	}
	out := make(map[string]bool, len(owned))
	for _, id := range owned {
		out[id] = true
	}
	return out, nil
}

// TakeOver takes what instances without a live lease left behind, this
// instance's own previous run included (call it after Join): their pooled
// keys, now this instance's to destroy (call Forget after each), and their
// claims, whose objects this instance destroys before it moves them to
// consumed (with Transition). A dead instance's row is removed, so it can
// never renew its lease: should it come back, its heartbeat fails with
// ErrLeaseLost.
//
// Only an instance whose own heartbeat has succeeded for a whole lease
// takes over: after an outage of PostgreSQL every lease has run out, and
// the instances must all have had a lease's time to renew theirs before
// any is judged dead.
func (c *Cluster) TakeOver(ctx context.Context) (pooled, claims []string, err error) {
	if !c.steady() {
		return nil, nil, nil
	}
	err = pgx.BeginFunc(ctx, c.s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "DELETE FROM instances WHERE lease_until < now() AND instance_id <> $1", c.id); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `UPDATE pool_keys SET instance_id = $1, state = 'destroying'
			WHERE (instance_id NOT IN (SELECT instance_id FROM instances) OR (instance_id = $1 AND state = 'destroying'))
			RETURNING unique_id`, c.id)
		if err != nil {
			return err
		}
		if pooled, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `UPDATE records SET claimed_by = $1
			WHERE state = 'consuming' AND claimed_by <> '' AND claimed_by NOT IN (SELECT instance_id FROM instances)
			RETURNING unique_id`, c.id)
		if err != nil {
			return err
		}
		claims, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("failed to take over dead instances' keys: %w", unavailable(err))
	}
	return pooled, claims, nil
}

// Reclaim is TakeOver's view of this instance's own previous run: its
// pooled keys and claims from before Join. Run once at start-up.
func (c *Cluster) Reclaim(ctx context.Context) (pooled, claims []string, err error) {
	err = pgx.BeginFunc(ctx, c.s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, "UPDATE pool_keys SET state = 'destroying' WHERE instance_id = $1 RETURNING unique_id", c.id)
		if err != nil {
			return err
		}
		if pooled, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return err
		}
		rows, err = tx.Query(ctx, "SELECT unique_id FROM records WHERE state = 'consuming' AND claimed_by = $1", c.id)
		if err != nil {
			return err
		}
		claims, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("failed to reclaim this instance's keys: %w", unavailable(err))
	}
	return pooled, claims, nil
}

// Live is the number of instances with a live lease (at least 1: this one).
func (c *Cluster) Live(ctx context.Context) (int, error) {
	var n int
	err := c.s.pool.QueryRow(ctx, "SELECT count(*) FROM instances WHERE lease_until >= now()").Scan(&n)
	if err != nil {
		return 0, unavailable(err)
	}
	return max(n, 1), nil
}

// Instance is one instance as the cluster sees it.
type Instance struct {
	ID              string    `json:"id"`
	Host            string    `json:"host"`
	StartedAt       time.Time `json:"startedAt"`
	HeartbeatAt     time.Time `json:"heartbeatAt"`
	LeaseUntil      time.Time `json:"leaseUntil"`
	Live            bool      `json:"live"`
	PoolReady       int       `json:"poolReady"`
	PoolKeys        int       `json:"poolKeys"` // recorded: generating, ready, being destroyed
	PendingDestroys int       `json:"pendingDestroys"`
}

// Status is the cluster as a whole, for `keyissuer status`.
type Status struct {
	Self        string     `json:"self"`
	Instances   []Instance `json:"instances"`
	Outstanding int        `json:"outstanding"` // issued keys, all instances
	Consuming   int        `json:"consuming"`   // claims in flight
	Orphaned    int        `json:"orphaned"`    // pooled keys of dead instances, not yet taken over
}

// Status reads the cluster's state.
func (c *Cluster) Status(ctx context.Context) (Status, error) {
	st := Status{Self: c.id, Instances: []Instance{}}
	rows, err := c.s.pool.Query(ctx, `SELECT i.instance_id, i.host, i.started_at, i.heartbeat_at, i.lease_until, i.lease_until >= now(),
			i.pool_ready, i.pending_destroys, (SELECT count(*) FROM pool_keys p WHERE p.instance_id = i.instance_id)
		FROM instances i ORDER BY i.instance_id`)
	if err != nil {
		return st, unavailable(err)
	}
	for rows.Next() {
		var in Instance
		if err := rows.Scan(&in.ID, &in.Host, &in.StartedAt, &in.HeartbeatAt, &in.LeaseUntil, &in.Live,
			&in.PoolReady, &in.PendingDestroys, &in.PoolKeys); err != nil {
			rows.Close()
			return st, unavailable(err)
		}
		in.StartedAt, in.HeartbeatAt, in.LeaseUntil = in.StartedAt.UTC(), in.HeartbeatAt.UTC(), in.LeaseUntil.UTC()
		st.Instances = append(st.Instances, in)
	}
	if err := rows.Err(); err != nil {
		return st, unavailable(err)
	}
	err = c.s.pool.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM records WHERE state = 'issued'),
		(SELECT count(*) FROM records WHERE state = 'consuming'),
		(SELECT count(*) FROM pool_keys WHERE instance_id NOT IN (SELECT instance_id FROM instances WHERE lease_until >= now()))`).
		Scan(&st.Outstanding, &st.Consuming, &st.Orphaned)
	return st, unavailable(err)
}

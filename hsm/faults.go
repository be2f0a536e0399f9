package hsm

import "sync/atomic"

// Faults counts the token's failures since Open, for metrics and alerts.
type Faults struct {
	// Down counts the times the token was found down (it failed a health
	// check); Recovered the times it came back.
	Down, Recovered uint64
	// SessionsRetired counts sessions found dead and replaced. In session
	// storage each took its keys with it.
	SessionsRetired uint64
}

type faultCounts struct {
	down, recovered, retired atomic.Uint64
}

// Faults returns the fault counters. Safe for concurrent use.
func (t *Token) Faults() Faults {
	return Faults{
		Down:            t.faults.down.Load(),
		Recovered:       t.faults.recovered.Load(),
		SessionsRetired: t.faults.retired.Load(),
	}
}

// Op names a PKCS#11 call, for [Config.AfterCall].
type Op string

// The calls the Token reports to [Config.AfterCall].
const (
	OpOpenSession       Op = "C_OpenSession"
	OpLogin             Op = "C_Login"
	OpGetTokenInfo      Op = "C_GetTokenInfo" // the health check
	OpGetSessionInfo    Op = "C_GetSessionInfo"
	OpGenerateKeyPair   Op = "C_GenerateKeyPair"
	OpGetAttributeValue Op = "C_GetAttributeValue"
	OpDecryptInit       Op = "C_DecryptInit"
	OpDecrypt           Op = "C_Decrypt"
	OpFindObjectsInit   Op = "C_FindObjectsInit"
	OpFindObjects       Op = "C_FindObjects"
	OpFindObjectsFinal  Op = "C_FindObjectsFinal"
	OpDestroyObject     Op = "C_DestroyObject"
)

// after passes the result of a PKCS#11 call through Config.AfterCall, the
// fault-injection seam of tests. In production it returns err.
func (t *Token) after(op Op, keyID string, err error) error {
	if t.cfg.AfterCall == nil {
		return err
	}
	return t.cfg.AfterCall(op, keyID, err)
}

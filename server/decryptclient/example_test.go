package decryptclient_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// The password-decrypt service asks for the one decrypt of a key. Only
// HSM_UNAVAILABLE is retried, by Decrypt itself; every other error is final
// for that uniqueId.
func ExampleClient_Decrypt() {
	c := decryptclient.New("/run/keyissuer/decrypt.sock")
	var uniqueID string   // from the merchant, with...
	var ciphertext []byte // ...the ciphertext its page made
	password, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
	var e *decryptclient.Error
	switch {
	case err == nil:
		defer clear(password)
		// use the password
	case errors.As(err, &e) && e.Code == decryptclient.DecryptFailed:
		fmt.Println("wrong padding or salt; the key is destroyed: apply again")
	case errors.As(err, &e) && e.Code == decryptclient.KeyConsumed:
		fmt.Println("the key was used already: apply again")
	default:
		fmt.Println("decrypt failed:", err)
	}
}

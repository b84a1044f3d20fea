package coordinator

import (
	"errors"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// remoteStatus is the HTTP status behind a go-containerregistry error, or 0.
func remoteStatus(err error) int {
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode
	}
	return 0
}

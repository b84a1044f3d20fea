package e2e

import (
	"testing"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestMain(m *testing.M) { testsupport.Main(m) }

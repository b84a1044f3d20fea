package e2e

import (
	"os"
	"testing"

	"github.com/berth-dev/berth/internal/testsupport"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testsupport.RemoveBuilds()
	os.Exit(code)
}

package coordinator

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/storage"
)

// nodeIDFile holds a node's ID in its data directory. The ID belongs to
// the disk, not to the address or the process: a node that restarts, or
// comes back under another address, with the same data directory is the
// same node (and holds the same blobs); a fresh disk is a new node.
const nodeIDFile = "node-id"

// nodeIDLen is the ID's length: 128 random bits in hex.
const nodeIDLen = 32

// loadNodeID reads the node's ID from dataDir, or makes one and keeps it
// there when there is none yet.
func loadNodeID(dataDir string) (string, error) {
	path := filepath.Join(dataDir, nodeIDFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		id := strings.TrimSpace(string(b))
		if !validNodeID(id) {
			return "", fmt.Errorf("%s: want %d lowercase hex digits, found %.64q; remove the file to make this a new node", path, nodeIDLen, id)
		}
		return id, nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", err
	}
	r := make([]byte, nodeIDLen/2)
	if _, err := rand.Read(r); err != nil {
		return "", err
	}
	id := hex.EncodeToString(r)
	if err := storage.WriteFileAtomic(path, []byte(id+"\n")); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return id, nil
}

func validNodeID(id string) bool {
	if len(id) != nodeIDLen {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

-- The fleet view (`rebound components`): when each component's certificate
-- expires, in ms since the Unix epoch (0 = unknown).
ALTER TABLE components ADD COLUMN cert_expiry_ms INTEGER NOT NULL DEFAULT 0;

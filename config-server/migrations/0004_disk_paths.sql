-- Each disk's file or device at the site its agent runs at (Hello's
-- Disk.path): a commit that keeps the source copy remembers these paths so
-- the first reprotect back can seed its replica from them. Empty when the
-- agent did not say.

ALTER TABLE disks ADD COLUMN path TEXT NOT NULL DEFAULT '';

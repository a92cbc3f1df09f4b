-- The replica holding a node's live session (replicas on PostgreSQL: an agent may dial any of
-- them, and the ones that do not lead relay its session to the leader). NULL while the node is
-- offline, and always on a single controller.
ALTER TABLE nodes ADD COLUMN session_replica TEXT;

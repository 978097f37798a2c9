-- SQLite has one writer at a time: an INSERT already holds the database write lock.
-- This migration exists so that both backends keep the same migration names.
SELECT 1;

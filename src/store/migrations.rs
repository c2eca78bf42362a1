//! Versioned, forward-only schema changes. Each step is the same change written once per
//! dialect, in `migrations/<dialect>/NNNN_name.sql`; the store's `meta` table records the
//! version reached. To change the schema, add both files and one entry at the end of
//! [`MIGRATIONS`] (and teach the row mapping in `sql.rs` any new column): stores are migrated
//! when they are opened, and an older binary then refuses the store by name.

use super::dialect::Dialect;

/// One schema step: the same change in each dialect.
pub struct Migration {
    pub version: i64,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Migration {
    pub(crate) fn sql(&self, dialect: Dialect) -> &'static str {
        match dialect {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }
}

/// Every step, in order; versions count up from 1 without gaps.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sqlite: include_str!("migrations/sqlite/0001_init.sql"),
    postgres: include_str!("migrations/postgres/0001_init.sql"),
}];

/// The schema version this binary writes and reads up to.
pub(crate) fn latest(migrations: &[Migration]) -> i64 {
    migrations.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
            assert!(!m.sqlite.trim().is_empty() && !m.postgres.trim().is_empty());
        }
        assert_eq!(latest(MIGRATIONS), MIGRATIONS.len() as i64);
    }

    #[test]
    fn both_dialects_create_the_same_tables_and_columns() {
        let names = |sql: &str| -> Vec<String> {
            sql.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("--") && !l.is_empty())
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .map(str::to_string)
                .collect()
        };
        for m in MIGRATIONS {
            assert_eq!(
                names(m.sqlite),
                names(m.postgres),
                "migration {}",
                m.version
            );
        }
    }
}

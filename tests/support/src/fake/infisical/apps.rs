//! The apps of the contract: their methods, credential fields, and which pairs rotate.

/// Zod-like type of a credential field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Str,
    Num,
    Bool,
}

pub(super) struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
    /// Never returned in a response.
    pub secret: bool,
}

const fn field(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
        secret: false,
    }
}

const fn optional(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
        secret: false,
    }
}

const fn secret(name: &'static str) -> Field {
    Field {
        name,
        kind: Kind::Str,
        required: true,
        secret: true,
    }
}

pub(super) struct MethodDef {
    pub name: &'static str,
    pub fields: &'static [Field],
}

pub(super) struct AppDef {
    pub app: &'static str,
    pub name: &'static str,
    pub methods: &'static [MethodDef],
    /// Accepts `isPlatformManagedCredentials`.
    pub platform_managed: bool,
    /// Accepts `gatewayId`.
    pub gateway: bool,
}

const SQL_METHODS: &[MethodDef] = &[MethodDef {
    name: "username-and-password",
    fields: &[
        field("host", Kind::Str),
        field("port", Kind::Num),
        field("database", Kind::Str),
        field("username", Kind::Str),
        secret("password"),
        field("sslEnabled", Kind::Bool),
        field("sslRejectUnauthorized", Kind::Bool),
        optional("sslCertificate", Kind::Str),
    ],
}];

const AZURE_METHODS: &[MethodDef] = &[
    MethodDef {
        name: "oauth",
        fields: &[secret("code"), optional("tenantId", Kind::Str)],
    },
    MethodDef {
        name: "client-secret",
        fields: &[
            field("clientId", Kind::Str),
            secret("clientSecret"),
            field("tenantId", Kind::Str),
        ],
    },
    MethodDef {
        name: "certificate",
        fields: &[
            field("clientId", Kind::Str),
            field("tenantId", Kind::Str),
            field("certificateBody", Kind::Str),
            secret("privateKey"),
        ],
    },
];

/// The apps of the contract, with their methods and credential fields.
pub(super) const APPS: &[AppDef] = &[
    AppDef {
        app: "databricks",
        name: "Databricks",
        methods: &[MethodDef {
            name: "service-principal",
            fields: &[
                field("clientId", Kind::Str),
                secret("clientSecret"),
                field("workspaceUrl", Kind::Str),
            ],
        }],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "mssql",
        name: "Microsoft SQL Server",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "postgres",
        name: "PostgreSQL",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "mysql",
        name: "MySQL",
        methods: SQL_METHODS,
        platform_managed: true,
        gateway: true,
    },
    AppDef {
        app: "azure-key-vault",
        name: "Azure Key Vault",
        methods: AZURE_METHODS,
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "azure-client-secrets",
        name: "Azure Client Secrets",
        methods: AZURE_METHODS,
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "ldap",
        name: "LDAP",
        methods: &[MethodDef {
            name: "simple-bind",
            fields: &[
                field("provider", Kind::Str),
                field("url", Kind::Str),
                field("dn", Kind::Str),
                secret("password"),
                optional("sslRejectUnauthorized", Kind::Bool),
                optional("sslCertificate", Kind::Str),
            ],
        }],
        platform_managed: false,
        gateway: true,
    },
    AppDef {
        app: "aws",
        name: "AWS",
        methods: &[
            MethodDef {
                name: "assume-role",
                fields: &[field("roleArn", Kind::Str)],
            },
            MethodDef {
                name: "access-key",
                fields: &[field("accessKeyId", Kind::Str), secret("secretAccessKey")],
            },
        ],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "github",
        name: "GitHub",
        methods: &[
            MethodDef {
                name: "github-app",
                fields: &[secret("code"), field("installationId", Kind::Str)],
            },
            MethodDef {
                name: "oauth",
                fields: &[secret("code")],
            },
        ],
        platform_managed: false,
        gateway: false,
    },
    AppDef {
        app: "gcp",
        name: "GCP",
        methods: &[MethodDef {
            name: "service-account-impersonation",
            fields: &[],
        }],
        platform_managed: false,
        gateway: false,
    },
];

/// The app/method pairs the server rotates; any other pair with auto-rotation gets a 400.
pub const ROTATING: [(&str, &str); 3] = [
    ("azure-key-vault", "client-secret"),
    ("azure-client-secrets", "client-secret"),
    ("ldap", "simple-bind"),
];

pub(super) fn app_def(app: &str) -> Option<&'static AppDef> {
    APPS.iter().find(|def| def.app == app)
}

pub(super) fn method_def(app: &AppDef, method: &str) -> Option<&'static MethodDef> {
    app.methods.iter().find(|m| m.name == method)
}

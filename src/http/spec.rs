//! What the OpenAPI document says beyond what the derives can: the errors every route can
//! answer, declared once, and the schemas of values whose Rust type would mislead a generated
//! client (seeds above 2^53 or 2^63) or whose rules live in code (enums, ranges, patterns).

use crate::config::Config;
use crate::domain::endpoint::default_allowed;
use crate::domain::generation::{ASPECT_RATIOS, NAMED_SIZES};
use crate::domain::idempotency::IdempotencyKey;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{
    AllOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// A downloaded file's bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(#[allow(dead_code)] Vec<u8>);

/// Visible ASCII, the characters an `Idempotency-Key` may hold.
const VISIBLE_ASCII: &str = "^[!-~]+$";
/// Text with at least one character that is not white space (the server trims, and refuses
/// what is left empty).
const WORDS: &str = "\\S";
const DIGITS: &str = "^[0-9]+$";

fn nullable(ty: Type) -> SchemaType {
    SchemaType::from_iter([ty, Type::Null])
}

/// A seed as clients send it: an integer, or the same number as a string of digits (the only
/// exact form for a JavaScript client once it passes 2^53).
pub fn seed_request() -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0u64))
                .maximum(Some(u64::MAX)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(DIGITS))
                .max_length(Some(20)),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "A seed from 0 to 18446744073709551615, as an integer or as a string of decimal \
             digits (send a string past 2^53 from a language whose numbers are doubles).",
        ))
        .into()
}

/// A seed as falgate answers it: always a string of decimal digits, since FAL's seeds go past
/// what an `int64` (and a JavaScript number) holds exactly.
pub fn seed_response() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::String))
        .pattern(Some(DIGITS))
        .max_length(Some(20))
        .description(Some(
            "The seed FAL used, as a string of decimal digits: it may exceed 2^63.",
        ))
        .examples(["17454220438242315174"])
        .into()
}

fn nullable_string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> ObjectBuilder {
    let mut values: Vec<serde_json::Value> = values.into_iter().map(Into::into).collect();
    values.push(serde_json::Value::Null);
    ObjectBuilder::new()
        .schema_type(nullable(Type::String))
        .enum_values(Some(values))
}

pub fn aspect_ratio() -> Schema {
    nullable_string_enum(ASPECT_RATIOS).into()
}

pub fn output_format() -> Schema {
    nullable_string_enum(crate::domain::generation::OUTPUT_FORMATS).into()
}

pub fn safety_tolerance() -> Schema {
    nullable_string_enum(["1", "2", "3", "4", "5", "6"]).into()
}

/// `image_size`: a named size, or a custom `{width, height}`.
pub fn image_size() -> Schema {
    let side = || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(14_142))
    };
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(NAMED_SIZES)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("width", side())
                .property("height", side())
                .required("width")
                .required("height")
                .additional_properties(Some(
                    utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
                )),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "LoRA avatars only: a named size or `{width, height}`; wins over the preset's.",
        ))
        .into()
}

/// `prompts`: at least one; the most per batch is the server's own (see [`with_limits`]).
pub fn prompts() -> Schema {
    ArrayBuilder::new()
        .schema_type(nullable(Type::Array))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .pattern(Some(WORDS)),
        )
        .min_items(Some(1))
        .description(Some(
            "Several prompts: one job each. At least one; at most the server's \
             `FALGATE_MAX_BATCH`.",
        ))
        .into()
}

/// The raw job's `endpoint`: the default allow-list. A server configured with another list
/// (`FALGATE_ALLOWED_ENDPOINTS`) serves its own list in `/openapi.json`.
pub fn endpoint() -> Schema {
    endpoint_enum(default_allowed())
}

fn endpoint_enum<'a>(allowed: impl IntoIterator<Item = &'a str>) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(allowed))
        .description(Some(
            "A FAL endpoint id from the server's allow-list. These are the defaults; an operator \
             can change the list with `FALGATE_ALLOWED_ENDPOINTS`, and a server's own \
             `/openapi.json` lists the endpoints it allows.",
        ))
        .examples(["fal-ai/flux-lora"])
        .into()
}

/// Puts a server's own limits into the document it serves: its endpoint allow-list, the most
/// photos an avatar may hold (so the most files one upload may carry) and the most prompts in a
/// batch. The committed document is the one a server with the default configuration serves.
fn with_limits(spec: &mut OpenApi, config: &Config) {
    let Some(components) = spec.components.as_mut() else {
        return;
    };
    if let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut("CreateJobRequest")
    {
        let allowed = config.allowed_endpoints.iter().map(|e| e.as_str());
        request
            .properties
            .insert("endpoint".into(), endpoint_enum(allowed).into());
    }
    if let Some(RefOr::T(Schema::Object(upload))) = components.schemas.get_mut("PhotoUpload")
        && let Some(RefOr::T(Schema::Array(files))) = upload.properties.get_mut("files")
    {
        files.max_items = Some(config.avatars.max_photos as usize);
    }
    if let Some(RefOr::T(Schema::Object(request))) =
        components.schemas.get_mut("CreateGenerationRequest")
        && let Some(RefOr::T(Schema::Array(prompts))) = request.properties.get_mut("prompts")
    {
        prompts.max_items = Some(config.avatars.max_batch as usize);
    }
}

/// The errors many routes share, each declared once under `components/responses` and referred
/// to by every operation that can answer it (unless the operation says it in its own words).
const SHARED: [(&str, &str, &str); 9] = [
    ("400", "BadBody", "The body could not be read or parsed."),
    ("401", "Unauthorized", "Missing or invalid API key."),
    (
        "409",
        "IdempotencyKeyInUse",
        "The Idempotency-Key is in use by a request still running.",
    ),
    ("413", "BodyTooLarge", "The body is over the size limit."),
    (
        "415",
        "UnsupportedMediaType",
        "The body is not of the content type this route takes.",
    ),
    ("422", "BadPathId", "An id in the path is not a UUID."),
    (
        "422",
        "Unprocessable",
        "A field or parameter is invalid, or the Idempotency-Key is malformed or was used for \
         another request.",
    ),
    (
        "500",
        "InternalError",
        "An unexpected failure; the body carries only the request id to quote.",
    ),
    (
        "503",
        "Unavailable",
        "The database is unavailable, or the server is at its connection limit; retry (after \
         `Retry-After` seconds when it is sent).",
    ),
];

fn shared_responses() -> impl Iterator<Item = (String, RefOr<utoipa::openapi::Response>)> {
    SHARED.iter().map(|(_, name, description)| {
        let response = ResponseBuilder::new()
            .description(*description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        ((*name).to_owned(), response.into())
    })
}

/// Declares the shared response `name` unless the operation states that status itself.
fn declare(operation: &mut Operation, name: &str) {
    let Some((status, name, _)) = SHARED.iter().find(|(_, shared, _)| *shared == name) else {
        return;
    };
    operation
        .responses
        .responses
        .entry((*status).to_owned())
        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
}

/// Completes the document: the server's limits, the errors every route shares, the
/// `Idempotency-Key` rules, and the rule no derive can state (exactly one of `prompt` and
/// `prompts`). Applied to the document as committed and as served.
pub fn complete(spec: &mut OpenApi, config: &Config) {
    with_limits(spec, config);
    spec.webhooks = Some(webhooks());
    spec.components
        .get_or_insert_with(Default::default)
        .responses
        .extend(shared_responses());
    for (path, item) in spec.paths.paths.iter_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            complete_operation(path, operation);
        }
    }
    if let Some(components) = spec.components.as_mut()
        && let Some(request) = components.schemas.remove("CreateGenerationRequest")
    {
        // A `null` is as good as absent to the server, so each alternative asks for a value.
        let given = |field: &str, ty: Type| {
            ObjectBuilder::new()
                .property(field, ObjectBuilder::new().schema_type(ty))
                .required(field)
        };
        let one_of_prompts = OneOfBuilder::new()
            .item(given("prompt", Type::String))
            .item(given("prompts", Type::Array))
            .description(Some("Exactly one of `prompt` and `prompts`."));
        components.schemas.insert(
            "CreateGenerationRequest".into(),
            AllOfBuilder::new()
                .item(request)
                .item(one_of_prompts)
                .into(),
        );
    }
}

fn complete_operation(path: &str, operation: &mut Operation) {
    declare(operation, "InternalError");
    // Probes are served even when every connection is busy; `/readyz` says its own 503.
    if path != "/healthz" {
        declare(operation, "Unavailable");
    }
    if operation.security.is_some() {
        declare(operation, "Unauthorized");
    }
    // FAL's callback is read as raw bytes under limits of its own, whatever its content type.
    if operation.request_body.is_some() && !path.starts_with("/v1/fal/") {
        for name in ["BadBody", "BodyTooLarge", "UnsupportedMediaType"] {
            declare(operation, name);
        }
    }
    let mut idempotent = false;
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        if parameter.parameter_in == ParameterIn::Header && parameter.name == "Idempotency-Key" {
            idempotent = true;
            parameter.schema = Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(IdempotencyKey::MAX_LEN))
                    .pattern(Some(VISIBLE_ASCII))
                    .into(),
            );
            parameter.description = Some(
                "Makes retries safe: the same key and body replay the first response. 1 to 255 \
                 visible ASCII characters."
                    .into(),
            );
        }
    }
    if idempotent {
        declare(operation, "IdempotencyKeyInUse");
        declare(operation, "Unprocessable");
    }
    // After the idempotency rules: their 422 says more than the path id's.
    let path_ids =
        operation.parameters.iter().flatten().any(
            |parameter| matches!(parameter, RefOr::T(p) if p.parameter_in == ParameterIn::Path),
        );
    if path_ids {
        declare(operation, "BadPathId");
    }
}

/// What falgate posts to a client's webhook endpoint (OpenAPI 3.1's `webhooks`), so that a
/// generated client has the type of every delivery.
fn webhooks() -> utoipa::openapi::Paths {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, PathItem};
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::{PathsBuilder, Required};
    let header = |name: &str, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::True)
            .description(Some(description))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build()
    };
    let delivery = OperationBuilder::new()
        .summary(Some("An event, delivered"))
        .description(Some(
            "Posted to each enabled webhook endpoint whose `event_types` take the event, and to \
             the `webhook` given with the request that made its job or batch. Signed per \
             Standard Webhooks: `webhook-signature` holds `v1,` and the base64 HMAC-SHA256 of \
             `{webhook-id}.{webhook-timestamp}.{body}` under the endpoint's secret (during a \
             rotation, one such signature per secret, space-separated). Any 2xx is success; \
             410 disables the endpoint; anything else is tried again later.",
        ))
        .parameter(header(
            "webhook-id",
            "The event's id: the same on every attempt and redelivery.",
        ))
        .parameter(header(
            "webhook-timestamp",
            "When this attempt was signed, in Unix seconds.",
        ))
        .parameter(header(
            "webhook-signature",
            "`v1,<base64>` signatures, space-separated.",
        ))
        .request_body(Some(
            RequestBodyBuilder::new()
                .description(Some("The event, as `GET /v1/events/{id}` shows it."))
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("EventView")))
                        .build(),
                )
                .required(Some(Required::True))
                .build(),
        ))
        .response(
            "2XX",
            ResponseBuilder::new()
                .description("The receiver took the event.")
                .build(),
        )
        .build();
    PathsBuilder::new()
        .path("event", PathItem::new(HttpMethod::Post, delivery))
        .build()
}
